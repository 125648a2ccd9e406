//! Evaluation data from the Hugging Face Hub (through the download code and cache): cais/mmlu and
//! openai/openai_humaneval, both stored there as parquet.

use super::humaneval::Problem;
use super::mmlu::{Question, Subject};
use crate::hub::download::{download_repo, DownloadOptions};
use crate::hub::{HubConfig, RepoKind};
use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn rows(path: &Path) -> Result<Vec<Row>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a parquet file", path.display()))?;
    reader.get_row_iter(None)?.map(|r| r.with_context(|| format!("{}: unreadable row", path.display()))).collect()
}

fn field<'a>(row: &'a Row, name: &str, path: &Path) -> Result<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
        .with_context(|| format!("{}: no column `{name}`", path.display()))
}

fn string(row: &Row, name: &str, path: &Path) -> Result<String> {
    match field(row, name, path)? {
        Field::Str(s) => Ok(s.clone()),
        other => bail!("{}: column `{name}` is not a string ({other:?})", path.display()),
    }
}

fn integer(row: &Row, name: &str, path: &Path) -> Result<i64> {
    match field(row, name, path)? {
        Field::Long(x) => Ok(*x),
        Field::Int(x) => Ok(*x as i64),
        Field::Short(x) => Ok(*x as i64),
        Field::Byte(x) => Ok(*x as i64),
        other => bail!("{}: column `{name}` is not an integer ({other:?})", path.display()),
    }
}

fn strings(row: &Row, name: &str, path: &Path) -> Result<Vec<String>> {
    match field(row, name, path)? {
        Field::ListInternal(list) => list
            .elements()
            .iter()
            .map(|e| match e {
                Field::Str(s) => Ok(s.clone()),
                other => bail!("{}: `{name}` holds a non-string ({other:?})", path.display()),
            })
            .collect(),
        other => bail!("{}: column `{name}` is not a list ({other:?})", path.display()),
    }
}

/// MMLU rows (question, subject, choices, answer) → subjects, in file order within each subject.
pub fn mmlu_from_parquet(dev: &[PathBuf], test: &[PathBuf]) -> Result<Vec<Subject>> {
    let mut subjects: BTreeMap<String, Subject> = BTreeMap::new();
    for (files, is_test) in [(dev, false), (test, true)] {
        for path in files {
            for row in rows(path)? {
                let subject = string(&row, "subject", path)?;
                let choices = strings(&row, "choices", path)?;
                let answer = integer(&row, "answer", path)?;
                if choices.len() != 4 || !(0..4).contains(&answer) {
                    bail!("{}: a `{subject}` row has {} choices and answer {answer}", path.display(), choices.len());
                }
                let q = Question {
                    question: string(&row, "question", path)?,
                    choices: [choices[0].clone(), choices[1].clone(), choices[2].clone(), choices[3].clone()],
                    answer: answer as usize,
                };
                let s = subjects.entry(subject.clone()).or_insert_with(|| Subject {
                    name: subject,
                    dev: vec![],
                    test: vec![],
                });
                if is_test {
                    s.test.push(q);
                } else {
                    s.dev.push(q);
                }
            }
        }
    }
    Ok(subjects.into_values().filter(|s| !s.test.is_empty()).collect())
}

pub fn humaneval_from_parquet(files: &[PathBuf]) -> Result<Vec<Problem>> {
    let mut out = vec![];
    for path in files {
        for row in rows(path)? {
            out.push(Problem {
                task_id: string(&row, "task_id", path)?,
                prompt: string(&row, "prompt", path)?,
                canonical_solution: string(&row, "canonical_solution", path)?,
                test: string(&row, "test", path)?,
                entry_point: string(&row, "entry_point", path)?,
            });
        }
    }
    Ok(out)
}

fn fetch(repo: &str, want: &dyn Fn(&str) -> bool, quiet: bool) -> Result<Vec<PathBuf>> {
    let cfg = HubConfig::from_env();
    // From the cache without network when the snapshot is there.
    let cached: Vec<PathBuf> = match cfg.cached_snapshot(RepoKind::Dataset, repo, "main") {
        Some(snap) => list_files(&snap).into_iter().filter(|f| want(&rel(&snap, f))).collect(),
        None => vec![],
    };
    let mut files = if !cached.is_empty() {
        cached
    } else {
        if cfg.offline {
            bail!(
                "{repo} is not in the cache at {} and HF_HUB_OFFLINE is set",
                cfg.repo_dir(RepoKind::Dataset, repo).display()
            );
        }
        let opts = DownloadOptions { quiet, json: quiet, ..Default::default() };
        let done = download_repo(&cfg, RepoKind::Dataset, repo, "main", want, &opts)?;
        done.files.iter().map(|f| done.snapshot.join(&f.name)).collect()
    };
    files.sort();
    Ok(files)
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default()
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(list_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// cais/mmlu from the hub (the `all/` dev and test splits).
pub fn mmlu_from_hub(quiet: bool) -> Result<Vec<Subject>> {
    let dev = fetch("cais/mmlu", &|n: &str| n.starts_with("all/dev") && n.ends_with(".parquet"), quiet)?;
    let test = fetch("cais/mmlu", &|n: &str| n.starts_with("all/test") && n.ends_with(".parquet"), quiet)?;
    mmlu_from_parquet(&dev, &test)
}

/// openai/openai_humaneval from the hub.
pub fn humaneval_from_hub(quiet: bool) -> Result<Vec<Problem>> {
    let files = fetch(
        "openai/openai_humaneval",
        &|n: &str| n.starts_with("openai_humaneval/") && n.ends_with(".parquet"),
        quiet,
    )?;
    humaneval_from_parquet(&files)
}

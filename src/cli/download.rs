//! `billion download`: fetch models (or datasets) from the Hugging Face Hub into the shared HF cache.

use crate::hub::download::{download_repo, sha256_file, DownloadOptions};
use crate::hub::registry::{self, KNOWN_DATASETS, KNOWN_MODELS};
use crate::hub::{repo_info, HubConfig, RepoKind};
use crate::util::human_bytes;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::Path;

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// Known aliases (see --list) or org/name repo ids
    pub models: Vec<String>,
    /// Branch, tag or commit
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Download a GGUF quantization (e.g. Q4_K_M, Q8_0) from the model's usual GGUF repo instead of safetensors;
    /// with --list, list the usual GGUF repos and whether that quantization is downloaded
    #[arg(long)]
    pub gguf: Option<String>,
    /// List the known models, what is downloaded and its size on disk
    #[arg(long)]
    pub list: bool,
    /// Re-hash what is on disk against the hub's checksums
    #[arg(long)]
    pub verify: bool,
    /// Download a dataset for bench: mmlu or humaneval
    #[arg(long)]
    pub dataset: Vec<String>,
    /// Print JSON to stdout (no progress bars)
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DownloadArgs) -> Result<()> {
    let cfg = HubConfig::from_env();
    if a.list {
        return match &a.gguf {
            Some(quant) => list_gguf(&cfg, quant, &a.revision, a.json),
            None => list(&cfg, &a.revision, a.json),
        };
    }
    if a.verify {
        if a.models.is_empty() {
            bail!("--verify: name the models to check");
        }
        let mut bad = 0;
        for m in &a.models {
            bad += verify(&cfg, m, &a.revision, a.json)?;
        }
        if bad > 0 {
            bail!("--verify: {bad} file(s) do not match the hub's checksums");
        }
        return Ok(());
    }
    if a.models.is_empty() && a.dataset.is_empty() {
        bail!("name at least one model (an alias from --list or an org/name repo id), or --dataset, --list, --verify");
    }
    let opts = DownloadOptions { json: a.json, ..Default::default() };
    let mut results = vec![];
    for d in &a.dataset {
        let (_, repo, prefixes) = KNOWN_DATASETS
            .iter()
            .find(|(alias, repo, _)| alias.eq_ignore_ascii_case(d) || repo == d)
            .with_context(|| format!("--dataset {d}: unknown (known: mmlu, humaneval)"))?;
        let want = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
        let done = download_repo(&cfg, RepoKind::Dataset, repo, &a.revision, &want, &opts)?;
        results.push(report(&done));
    }
    for m in &a.models {
        let done = match &a.gguf {
            None => {
                let repo =
                    registry::repo_id(m).with_context(|| format!("{m}: not a known alias or an org/name repo id"))?;
                download_repo(&cfg, RepoKind::Model, &repo, &a.revision, &registry::wanted_model_file, &opts)?
            }
            Some(quant) => {
                let repo = match registry::find(m) {
                    Some(k) => k
                        .gguf_repo
                        .with_context(|| format!("{m}: no usual GGUF repo is known; pass the GGUF repo id itself"))?
                        .to_string(),
                    None => registry::repo_id(m)
                        .with_context(|| format!("{m}: not a known alias or an org/name repo id"))?,
                };
                let info = repo_info(&cfg, RepoKind::Model, &repo, &a.revision)?;
                let mut matches: Vec<String> =
                    info.files.iter().filter(|f| is_gguf_of(&f.name, quant)).map(|f| f.name.clone()).collect();
                matches.sort();
                let pick = matches.first().cloned().with_context(|| {
                    let all: Vec<&str> =
                        info.files.iter().filter(|f| f.name.ends_with(".gguf")).map(|f| f.name.as_str()).collect();
                    format!("{repo}: no GGUF file matching {quant} (has: {})", all.join(", "))
                })?;
                let files: Vec<_> = info.files.iter().filter(|f| f.name == pick).cloned().collect();
                crate::hub::download::download_files(
                    &cfg,
                    RepoKind::Model,
                    &repo,
                    &a.revision,
                    &info.commit,
                    &files,
                    &opts,
                )?
            }
        };
        if !a.json {
            eprintln!("{}: {} files in {}", done.repo, done.files.len(), done.snapshot.display());
        }
        results.push(report(&done));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

fn report(d: &crate::hub::download::Downloaded) -> serde_json::Value {
    serde_json::json!({"repo": d.repo, "commit": d.commit, "path": d.snapshot.display().to_string(), "files": d.files})
}

fn dir_size(snap: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(snap) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_size(&p);
            } else if let Ok(m) = std::fs::metadata(&p) {
                total += m.len();
            }
        }
    }
    total
}

fn list(cfg: &HubConfig, revision: &str, json: bool) -> Result<()> {
    let mut rows = vec![];
    for m in KNOWN_MODELS {
        let snap = cfg.cached_snapshot(RepoKind::Model, m.repo_id, revision);
        let complete = snap.as_ref().is_some_and(|s| crate::hub::download::snapshot_complete(s));
        let size = snap.as_ref().map(|s| dir_size(s)).unwrap_or(0);
        rows.push(serde_json::json!({
            "alias": m.alias, "repo": m.repo_id, "architecture": m.architecture, "params_b": m.params_b,
            "license": m.license, "gated": m.gated, "role": m.role, "gguf_repo": m.gguf_repo,
            "downloaded": complete, "size_on_disk": size,
            "path": snap.map(|s| s.display().to_string()),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<38} {:<9} {:>7} {:<6} {:<11} {:>10}",
        "alias", "repo", "arch", "params", "gated", "downloaded", "on disk"
    );
    for r in rows {
        println!(
            "{:<16} {:<38} {:<9} {:>6.2}B {:<6} {:<11} {:>10}",
            r["alias"].as_str().unwrap_or(""),
            r["repo"].as_str().unwrap_or(""),
            r["architecture"].as_str().unwrap_or(""),
            r["params_b"].as_f64().unwrap_or(0.0),
            if r["gated"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            if r["downloaded"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            human_bytes(r["size_on_disk"].as_u64().unwrap_or(0)),
        );
    }
    println!("cache: {}", cfg.cache_dir.display());
    Ok(())
}

/// Does this file name hold the GGUF quantization `quant` (case-insensitive, as `--gguf` picks files)?
fn is_gguf_of(name: &str, quant: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.ends_with(".gguf") && name.contains(&quant.to_ascii_lowercase())
}

/// `--list --gguf Q`: the known models' usual GGUF repos and whether their `Q` file is in the cache.
fn list_gguf(cfg: &HubConfig, quant: &str, revision: &str, json: bool) -> Result<()> {
    let mut rows = vec![];
    for m in KNOWN_MODELS {
        let Some(gguf_repo) = m.gguf_repo else { continue };
        let snap = cfg.cached_snapshot(RepoKind::Model, gguf_repo, revision);
        let file = snap.as_ref().and_then(|s| {
            let mut names: Vec<_> = std::fs::read_dir(s)
                .ok()?
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_gguf_of(n, quant))
                .collect();
            names.sort();
            names.into_iter().next().map(|n| s.join(n))
        });
        let size = file.as_ref().and_then(|f| std::fs::metadata(f).ok()).map(|md| md.len()).unwrap_or(0);
        rows.push(serde_json::json!({
            "alias": m.alias, "repo": gguf_repo, "base_repo": m.repo_id, "quantization": quant,
            "architecture": m.architecture, "params_b": m.params_b, "license": m.license, "gated": m.gated,
            "downloaded": file.is_some(), "size_on_disk": size,
            "path": file.map(|f| f.display().to_string()),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<16} {:<44} {:<9} {:<11} {:>10}", "alias", "GGUF repo", "quant", "downloaded", "on disk");
    for r in rows {
        println!(
            "{:<16} {:<44} {:<9} {:<11} {:>10}",
            r["alias"].as_str().unwrap_or(""),
            r["repo"].as_str().unwrap_or(""),
            quant,
            if r["downloaded"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            human_bytes(r["size_on_disk"].as_u64().unwrap_or(0)),
        );
    }
    println!("cache: {}", cfg.cache_dir.display());
    Ok(())
}

/// Hash every cached file of a model; returns the number that do not match.
fn verify(cfg: &HubConfig, name: &str, revision: &str, json: bool) -> Result<usize> {
    let repo = registry::repo_id(name).with_context(|| format!("--verify {name}: not a known alias or org/name"))?;
    let snap = cfg
        .cached_snapshot(RepoKind::Model, &repo, revision)
        .with_context(|| format!("--verify {name}: nothing of {repo} at {revision} in {}", cfg.cache_dir.display()))?;
    // Expected digests from the hub when reachable; else the blob names (LFS blobs are named by sha256).
    let listed = if cfg.offline { None } else { repo_info(cfg, RepoKind::Model, &repo, revision).ok() };
    let mut bad = 0;
    let mut rows = vec![];
    for entry in std::fs::read_dir(&snap)?.flatten() {
        let path = entry.path();
        let fname = entry.file_name().to_string_lossy().into_owned();
        let blob = std::fs::canonicalize(&path).unwrap_or(path.clone());
        let blob_name = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let expected = listed
            .as_ref()
            .and_then(|i| i.files.iter().find(|f| f.name == fname))
            .and_then(|f| f.sha256.clone())
            .or_else(|| {
                (blob_name.len() == 64 && blob_name.chars().all(|c| c.is_ascii_hexdigit())).then_some(blob_name)
            });
        let Some(expected) = expected else {
            rows.push(serde_json::json!({"file": fname, "status": "no checksum (small git file)"}));
            continue;
        };
        let got = sha256_file(&blob)?;
        let ok = got == expected;
        if !ok {
            bad += 1;
        }
        if !json {
            eprintln!(
                "{} {fname}{}",
                if ok { "ok      " } else { "MISMATCH" },
                if ok { String::new() } else { format!(": expected {expected}, got {got}") }
            );
        }
        rows.push(serde_json::json!({"file": fname, "status": if ok { "ok" } else { "mismatch" }, "expected": expected, "sha256": got}));
    }
    if json {
        println!("{}", serde_json::json!({"repo": repo, "files": rows}));
    }
    Ok(bad)
}

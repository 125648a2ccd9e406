//! Parameters → runs → records: every model × quantization is loaded in turn, measured by the chosen
//! evaluators, and its [`ModelRecord`] saved to the results folder before the next model is loaded.

use super::humaneval::{self, Outcome, Problem, Sandbox};
use super::mmlu::{self, Subject};
use super::params::BenchParams;
use super::records::{HumanEvalRecord, ModelRecord, SpeedRecord};
use super::{datasets, report, speed};
use crate::generation::{generate, sampling::SamplingParams, GenerateParams};
use crate::load::device::{device_name, dtype_name};
use crate::load::{LoadOptions, LoadedModel};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A progress bar on stderr, hidden when `hidden` (`--json`) or when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str, hidden: bool) -> ProgressBar {
    let b = ProgressBar::new(len);
    if hidden || !std::io::stderr().is_terminal() {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    b.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// The questions the evaluators ask, loaded once for every model.
#[derive(Debug, Clone, Default)]
pub struct Datasets {
    /// MMLU subjects (empty when MMLU does not run).
    pub subjects: Vec<Subject>,
    /// HumanEval problems, already cut to the limit (empty when HumanEval does not run).
    pub problems: Vec<Problem>,
}

impl Datasets {
    /// From the given folder and file, or from the hub where none is given.
    pub fn load(params: &BenchParams) -> Result<Self> {
        let m = &params.mmlu;
        let subjects = match (params.evaluators.mmlu, &m.dir) {
            (false, _) => vec![],
            (true, Some(dir)) => mmlu::load_dir(dir, m.subjects.as_deref())?,
            (true, None) => {
                let mut all = datasets::mmlu_from_hub(params.json)
                    .context("MMLU from the hub (cais/mmlu); or pass --mmlu-dir")?;
                if let Some(only) = &m.subjects {
                    for s in only {
                        if !all.iter().any(|x| &x.name == s) {
                            bail!("--subjects: unknown subject `{s}`");
                        }
                    }
                    all.retain(|x| only.contains(&x.name));
                }
                all
            }
        };
        let problems = if params.evaluators.humaneval {
            let mut p = match &params.humaneval.file {
                Some(file) => humaneval::load_file(file)?,
                None => datasets::humaneval_from_hub(params.json)
                    .context("HumanEval from the hub (openai/openai_humaneval); or pass --humaneval-file")?,
            };
            if let Some(n) = params.humaneval.limit {
                p.truncate(n);
            }
            p
        } else {
            vec![]
        };
        Ok(Self { subjects, problems })
    }
}

/// Run every model × quantization of `params`, loading each with `load` (which may add its own error
/// context), saving each record to the results folder as soon as it is complete. Once `interrupted` is set,
/// the current step finishes, its record is saved and no further step or model starts. Returns this run's
/// records.
pub fn run(
    params: &BenchParams,
    data: &Datasets,
    mut load: impl FnMut(&str, &LoadOptions) -> Result<LoadedModel>,
    interrupted: &AtomicBool,
) -> Result<Vec<ModelRecord>> {
    let groups = mmlu::subject_groups();
    let mut records = vec![];
    'models: for name in &params.models {
        for q in &params.quantize {
            if interrupted.load(Ordering::Relaxed) {
                break 'models;
            }
            let loaded = load(name, &params.load_options(*q)).with_context(|| format!("loading {name}"))?;
            let record = run_model(params, data, name, &loaded, &groups, interrupted)?;
            report::save(&params.results_dir, &record)?;
            records.push(record);
            drop(loaded); // free this model before loading the next
        }
    }
    Ok(records)
}

/// The evaluators of `params` on one loaded model.
pub fn run_model(
    params: &BenchParams,
    data: &Datasets,
    name: &str,
    loaded: &LoadedModel,
    groups: &BTreeMap<String, String>,
    interrupted: &AtomicBool,
) -> Result<ModelRecord> {
    let quiet = params.json;
    let cfg = loaded.config();
    let gpu = loaded.model.device().clone();
    let mut gpu_peak = crate::util::gpu_memory_used_bytes(&gpu);
    let mut sample_gpu = || {
        if let Some(now) = crate::util::gpu_memory_used_bytes(&gpu) {
            gpu_peak = Some(gpu_peak.unwrap_or(0).max(now));
        }
    };
    let mut record = ModelRecord {
        name: name.to_string(),
        source: loaded.source.display().to_string(),
        format: loaded.format.to_string(),
        architecture: cfg.architecture.name().to_string(),
        parameters: cfg.parameter_count(),
        dtype: dtype_name(loaded.model.dtype()).to_string(),
        quantization: loaded.quantization.clone(),
        device: device_name(loaded.model.device()),
        date_unix: report::now(),
        load_s: loaded.load_seconds,
        weights_bytes: loaded.model.weight_bytes() as u64,
        ..Default::default()
    };
    let ev = params.evaluators;
    if ev.speed && !interrupted.load(Ordering::Relaxed) {
        let s = params.speed;
        let pb = progress_bar(2, "speed", quiet);
        let r = speed::measure(&loaded.model, s.prefill, s.decode, s.reps)?;
        sample_gpu();
        pb.finish_and_clear();
        let ttft = speed::time_prefill(&loaded.model, s.prefill.max(1))? * 1000.0;
        record.speed = Some(SpeedRecord {
            prefill: r.prefill,
            decode: r.decode,
            ttft_ms: ttft,
            prompt_tokens: s.prefill,
            generated_tokens: s.decode,
            reps: s.reps,
            extra: Default::default(),
        });
    }
    if ev.mmlu && !interrupted.load(Ordering::Relaxed) {
        let m = &params.mmlu;
        let total: usize = data.subjects.iter().map(|s| m.limit.unwrap_or(s.test.len()).min(s.test.len())).sum();
        let pb = progress_bar(total as u64, "MMLU", quiet);
        let start = Instant::now();
        let (res, details) =
            mmlu::evaluate(loaded, &data.subjects, m.shots, m.limit, groups, m.prefix_reuse, |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        record.mmlu = Some(mmlu::summarize(res, details, m.shots, m.prefix_reuse, start.elapsed().as_secs_f64()));
    }
    if ev.humaneval && !interrupted.load(Ordering::Relaxed) {
        record.humaneval = Some(run_humaneval(params, loaded, &data.problems, interrupted)?);
    }
    sample_gpu();
    record.peak_rss_bytes = crate::util::peak_rss_bytes();
    // Sampled after each step: the card's memory in use (all processes), at its highest.
    record.gpu_memory_peak_bytes = gpu_peak;
    Ok(record)
}

/// Generate `samples` completions per problem (stopping early once `interrupted`), run them in the sandbox
/// and score them.
pub fn run_humaneval(
    params: &BenchParams,
    loaded: &LoadedModel,
    problems: &[Problem],
    interrupted: &AtomicBool,
) -> Result<HumanEvalRecord> {
    let h = &params.humaneval;
    let quiet = params.json;
    let tok = loaded.tokenizer()?;
    let samples = h.samples.max(1);
    let pb = progress_bar((problems.len() * samples) as u64, "HumanEval gen", quiet);
    let mut programs = vec![];
    let mut completions = vec![];
    for (pi, p) in problems.iter().enumerate() {
        for s in 0..samples {
            if interrupted.load(Ordering::Relaxed) {
                break;
            }
            let mut ids = tok.encode(&p.prompt, true)?;
            // A prompt that leaves no room to answer keeps its last tokens (as MMLU contexts do).
            let window = loaded.config().max_position_embeddings;
            let budget = h.max_tokens.min(window / 2);
            if ids.len() + budget > window {
                ids.drain(..ids.len() + budget - window);
            }
            let sampling =
                SamplingParams { seed: h.sampling.seed.wrapping_add((pi * 1000 + s) as u64), ..h.sampling.clone() };
            let mut gp = GenerateParams::new(budget, sampling, loaded.eos_ids());
            gp.stop_strings = humaneval::STOP_SEQUENCES.iter().map(|s| s.to_string()).collect();
            let mut cache = loaded.model.new_cache();
            let g = generate(&loaded.model, Some(tok), &ids, &mut cache, &gp, |_| {})?;
            programs.push(humaneval::check_program(p, &g.text));
            completions.push((pi, g.text));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let sandbox = Sandbox { timeout: Duration::from_secs_f64(h.timeout), ..Default::default() };
    let pb = progress_bar(programs.len() as u64, "HumanEval run", quiet);
    let outcomes = sandbox.run_all(&programs, || pb.inc(1))?;
    pb.finish_and_clear();
    Ok(humaneval::summarize(problems, &completions, &outcomes, samples, h.sampling.temperature))
}

/// HumanEval's canonical solutions run through the sandbox: each problem's task id and outcome.
pub fn humaneval_selfcheck(file: Option<&Path>, timeout: f64, quiet: bool) -> Result<Vec<(String, Outcome)>> {
    let problems = match file {
        Some(file) => humaneval::load_file(file)?,
        None => datasets::humaneval_from_hub(quiet)?,
    };
    let programs: Vec<String> = problems.iter().map(|p| humaneval::check_program(p, &p.canonical_solution)).collect();
    let sandbox = Sandbox { timeout: Duration::from_secs_f64(timeout), ..Default::default() };
    let pb = progress_bar(programs.len() as u64, "selfcheck", quiet);
    let outcomes = sandbox.run_all(&programs, || pb.inc(1))?;
    pb.finish_and_clear();
    Ok(problems.into_iter().map(|p| p.task_id).zip(outcomes).collect())
}

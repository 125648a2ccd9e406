//! Parameters → runs → records: every model × quantization is loaded in turn, measured by the chosen
//! evaluators, and its [`ModelRecord`] saved to the results folder before the next model is loaded. Ctrl-C
//! is checked before every MMLU question, HumanEval completion (and token) and sandbox run.

use super::humaneval::{self, Outcome, Problem, Sandbox};
use super::mmlu::{self, BatchSize, Subject};
use super::params::{BenchParams, HumanEvalMode};
use super::records::{HumanEvalRecord, ModelRecord, SpeedRecord};
use super::{datasets, report, speed};
use crate::chat::end_of_turn_ids;
use crate::chat::template::{ChatTemplate, Message};
use crate::dist::Group;
use crate::generation::batch::{generate_batch, BatchParams, BatchRequest};
use crate::generation::{sampling::SamplingParams, StopReason};
use crate::load::device::{device_name, dtype_name};
use crate::load::{LoadOptions, LoadedModel};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
        if let Some(s) = subjects.iter().find(|s| s.dev.len() < m.shots) {
            let fewest = subjects.iter().map(|s| s.dev.len()).min().unwrap_or(0);
            bail!(
                "--shots {}: the dev set of `{}` has {} rows, so at most {fewest} shots can be given",
                m.shots,
                s.name,
                s.dev.len()
            );
        }
        let problems = if params.evaluators.humaneval {
            let mut p = match &params.humaneval.file {
                Some(file) => humaneval::load_file(file).context("--humaneval-file")?,
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

/// Whether `flag` is set.
fn set(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed)
}

/// One model's peak resident memory: the kernel's high-water mark reset before the model is loaded (Linux:
/// writing 5 to /proc/self/clear_refs), or, where that cannot be done, the largest resident size sampled after
/// each step.
pub struct PeakRss {
    reset: bool,
    sampled: Option<u64>,
}

impl PeakRss {
    /// Start measuring: give freed memory (the previous model's) back to the OS, then reset the high-water mark.
    pub fn start() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the OS.
        unsafe {
            libc::malloc_trim(0);
        }
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Self { reset, sampled: crate::util::rss_bytes() }
    }

    pub fn sample(&mut self) {
        if let Some(now) = crate::util::rss_bytes() {
            self.sampled = Some(self.sampled.unwrap_or(0).max(now));
        }
    }

    pub fn peak(&mut self) -> Option<u64> {
        self.sample();
        let hwm = if self.reset { crate::util::peak_rss_bytes() } else { None };
        match (hwm, self.sampled) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What [`run`] did: the records saved, and the runs (model and quantization) that Ctrl-C kept from starting.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub records: Vec<ModelRecord>,
    pub not_started: Vec<String>,
}

/// Run every model × quantization of `params`, loading each with `load` (which may add its own error
/// context), saving each record to the results folder as soon as it is complete. Once `interrupted` is set,
/// the MMLU question or HumanEval problem being worked on finishes, the record is saved marked interrupted
/// (with the evaluators that did not run named), and no further step or model starts.
pub fn run(
    params: &BenchParams,
    data: &Datasets,
    load: impl FnMut(&str, &LoadOptions) -> Result<LoadedModel>,
    interrupted: &Arc<AtomicBool>,
) -> Result<RunSummary> {
    run_rank(params, data, load, interrupted, &Group::single())
}

/// [`run`] as one data-parallel rank of `group` (see [`crate::dist`]): every rank loads each model; MMLU's
/// question chunks and HumanEval's completions are shared out between the ranks and their results merged, so
/// every record is the one a single rank writes; the speed step runs on rank 0 alone. Rank 0 saves the records.
pub fn run_rank(
    params: &BenchParams,
    data: &Datasets,
    mut load: impl FnMut(&str, &LoadOptions) -> Result<LoadedModel>,
    interrupted: &Arc<AtomicBool>,
    group: &Group,
) -> Result<RunSummary> {
    let groups = mmlu::subject_groups();
    let mut summary = RunSummary::default();
    if group.world() > 1 {
        group.agree("benchmark options", &params.signature())?;
        let questions: Vec<(&str, usize)> = data.subjects.iter().map(|s| (s.name.as_str(), s.test.len())).collect();
        let problems: Vec<&str> = data.problems.iter().map(|p| p.task_id.as_str()).collect();
        group.agree("datasets", &format!("{questions:?} {problems:?}"))?;
    }
    for name in &params.models {
        for q in &params.quantize {
            let what = format!("{name} ({})", q.map(|q| q.name()).unwrap_or("none"));
            if stopped(group, interrupted)? {
                summary.not_started.push(what);
                continue;
            }
            let mut rss = PeakRss::start();
            let loaded = load(name, &params.load_options(*q)).with_context(|| format!("loading {name}"))?;
            if group.world() > 1 {
                group.agree("model", &crate::dist::model_fingerprint(&loaded))?;
            }
            if let Some(note) = loaded.kept_dense_note().filter(|_| !params.json && group.is_main()) {
                eprintln!("note: {what}: {note}");
            }
            rss.sample();
            let record = run_model(params, data, name, &loaded, &groups, interrupted, &mut rss, group)?;
            if group.is_main() {
                report::save(&params.results_dir, &record)?;
            }
            summary.records.push(record);
            drop(loaded); // free this model before loading the next
        }
    }
    Ok(summary)
}

/// Whether Ctrl-C was pressed on any rank (every rank gets the same answer, so all skip the same steps).
fn stopped(group: &Group, interrupted: &AtomicBool) -> Result<bool> {
    group.any(set(interrupted))
}

/// Say on stderr which step of which model starts (progress where no bar is drawn).
fn step(params: &BenchParams, group: &Group, name: &str, loaded: &LoadedModel, what: &str) {
    if !params.json && group.is_main() {
        eprintln!("bench: {} ({}): {what}", report::short_name(name), loaded.quantization);
    }
}

/// The evaluators of `params` on one loaded model; `rss` measures its memory from its load on.
#[allow(clippy::too_many_arguments)]
pub fn run_model(
    params: &BenchParams,
    data: &Datasets,
    name: &str,
    loaded: &LoadedModel,
    groups: &BTreeMap<String, String>,
    interrupted: &Arc<AtomicBool>,
    rss: &mut PeakRss,
    group: &Group,
) -> Result<ModelRecord> {
    // Rank 0 shows progress; every rank's share is merged into its record.
    let quiet = params.json || !group.is_main();
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
        date_unix: crate::util::now(),
        load_s: loaded.load_seconds,
        weights_bytes: loaded.model.weight_bytes() as u64,
        kept_dense: loaded.kept_dense.len(),
        ..Default::default()
    };
    if group.world() > 1 {
        record.device = group.all_gather_json(&record.device)?.join("+");
    }
    let ev = params.evaluators;
    if ev.speed && group.is_main() {
        if set(interrupted) {
            record.not_run.push("speed".into());
        } else {
            let s = params.speed;
            step(params, group, name, loaded, &format!("speed (-p {} -n {} -r {})", s.prefill, s.decode, s.reps));
            let pb = progress_bar(2, "speed", quiet);
            let measured = speed::measure_until(&loaded.model, s.prefill, s.decode, s.reps, interrupted)?;
            sample_gpu();
            pb.finish_and_clear();
            // A speed step cut short keeps no figures: a partial set of repetitions is not a measurement.
            if let Some(r) = measured {
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
            } else {
                record.not_run.push("speed".into());
            }
            rss.sample();
        }
    }
    if ev.mmlu {
        if stopped(group, interrupted)? {
            record.not_run.push("mmlu".into());
        } else {
            let m = &params.mmlu;
            let total: usize = data.subjects.iter().map(|s| m.limit.unwrap_or(s.test.len()).min(s.test.len())).sum();
            let start = Instant::now();
            // With several ranks, each scores its chunks and its bar counts those.
            let (owners, mine, what) = if group.world() > 1 {
                let owners = mmlu::shard(loaded.tokenizer()?, &data.subjects, m.shots, m.limit, group.world())?;
                let mine = mmlu::questions_of(&owners, &data.subjects, m.limit, group.rank());
                (Some(owners), mine, format!("MMLU, {total} questions over {} ranks", group.world()))
            } else {
                (None, total, format!("MMLU, {total} questions"))
            };
            step(params, group, name, loaded, &what);
            let pb = progress_bar(mine as u64, "MMLU", quiet);
            let run = mmlu::evaluate_ranks(
                group,
                owners.as_deref(),
                loaded,
                &data.subjects,
                m.shots,
                m.limit,
                groups,
                m.prefix_reuse,
                params.batch_size,
                interrupted,
                |n| pb.inc(n as u64),
            )?;
            pb.finish_and_clear();
            record.mmlu = Some(mmlu::summarize(run, m.shots, m.prefix_reuse, start.elapsed().as_secs_f64()));
            sample_gpu();
            rss.sample();
        }
    }
    if ev.humaneval {
        if stopped(group, interrupted)? {
            record.not_run.push("humaneval".into());
        } else {
            record.humaneval = Some(run_humaneval(params, name, loaded, &data.problems, interrupted, group)?);
            sample_gpu();
            rss.sample();
        }
    }
    record.interrupted = stopped(group, interrupted)?;
    record.peak_rss_bytes = rss.peak();
    // Sampled after each step: the card's memory in use (all processes), at its highest.
    record.gpu_memory_peak_bytes = gpu_peak;
    Ok(record)
}

/// The prompt tokens of one problem: the prompt itself (base), or the prompt rendered as a chat message with
/// the model's template (instruct). A prompt that leaves no room to answer keeps its last tokens.
fn problem_tokens(loaded: &LoadedModel, p: &Problem, mode: HumanEvalMode, budget: usize) -> Result<Vec<u32>> {
    let tok = loaded.tokenizer()?;
    let mut ids = match mode {
        HumanEvalMode::Instruct => {
            let template = ChatTemplate::new(tok.chat_template.clone(), tok.bos_token.clone(), tok.eos_token.clone());
            let text = template.render(&[Message::new("user", &humaneval::instruct_message(p))], true, &json!({}))?;
            // As for chat: the template carries any BOS it wants.
            tok.encode(&text, template.is_fallback())?
        }
        _ => tok.encode(&p.prompt, true)?,
    };
    let window = loaded.config().max_position_embeddings;
    if ids.len() + budget > window {
        ids.drain(..ids.len() + budget - window);
    }
    Ok(ids)
}

/// Generate `samples` completions per problem, run them in the sandbox and score them. Once `interrupted` is
/// set no further completion or program starts (the one generating stops at its next token and is dropped):
/// the record covers the completions generated and run before, and says it was interrupted.
pub fn run_humaneval(
    params: &BenchParams,
    name: &str,
    loaded: &LoadedModel,
    problems: &[Problem],
    interrupted: &Arc<AtomicBool>,
    group: &Group,
) -> Result<HumanEvalRecord> {
    let h = &params.humaneval;
    let quiet = params.json || !group.is_main();
    let tok = loaded.tokenizer()?;
    let mode = h.mode.resolve(tok.chat_template.is_some());
    let samples = h.samples.max(1);
    step(params, group, name, loaded, &format!("HumanEval ({}), {} problems × {samples}", mode.name(), problems.len()));
    let pb = progress_bar((problems.len() * samples) as u64, "HumanEval gen", quiet);
    let budget = h.max_tokens.min(loaded.config().max_position_embeddings / 2);
    // Every problem × sample is one request of a continuously refilled batch; each sample keeps the seed it
    // has when generated alone.
    // `requests[i]` is a completion of problem `problem_of[i]`.
    let (mut requests, mut problem_of) = (vec![], vec![]);
    for (pi, p) in problems.iter().enumerate() {
        let ids = problem_tokens(loaded, p, mode, budget)?;
        for s in 0..samples {
            let sampling =
                SamplingParams { seed: h.sampling.seed.wrapping_add((pi * 1000 + s) as u64), ..h.sampling.clone() };
            let stop_strings = match mode {
                HumanEvalMode::Instruct => vec![],
                _ => humaneval::STOP_SEQUENCES.iter().map(|s| s.to_string()).collect(),
            };
            requests.push(BatchRequest { prompt: ids.clone(), max_tokens: budget, stop_strings, sampling });
            problem_of.push(pi);
        }
    }
    let eos_ids = match mode {
        HumanEvalMode::Instruct => end_of_turn_ids(loaded),
        _ => loaded.eos_ids(),
    };
    // With several ranks each generates and runs its share of the completions (balanced by prompt tokens plus
    // the token budget); every completion keeps its own seed, so the shares add up to one rank's run.
    let costs: Vec<usize> = requests.iter().map(|r| r.prompt.len() + budget).collect();
    let owners = crate::dist::shard::assign(&costs, group.world());
    let mine: Vec<usize> = (0..requests.len()).filter(|&i| owners[i] == group.rank()).collect();
    let my_requests: Vec<BatchRequest> = mine.iter().map(|&i| requests[i].clone()).collect();
    if group.world() > 1 {
        pb.set_length(mine.len() as u64);
    }
    let rows = match params.batch_size {
        BatchSize::Rows(n) => n,
        BatchSize::Auto => {
            generation_rows(loaded, budget + my_requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0))
        }
    };
    let batch = BatchParams { batch: rows, eos_ids, interrupt: Some(interrupted.clone()) };
    let mut texts: Vec<Option<String>> = vec![None; my_requests.len()];
    let stats = generate_batch(&loaded.model, Some(tok), &my_requests, &batch, |i, out| {
        if out.stop_reason != StopReason::Interrupted {
            texts[i] = Some(out.text);
            pb.inc(1);
        }
        Ok(())
    })?;
    let mut programs = vec![];
    let mut generated = vec![];
    for (&i, text) in mine.iter().zip(texts) {
        let Some(text) = text else { continue };
        let p = &problems[problem_of[i]];
        programs.push(match mode {
            HumanEvalMode::Instruct => humaneval::instruct_program(p, &text),
            _ => humaneval::check_program(p, &text),
        });
        generated.push((i, text));
    }
    pb.finish_and_clear();
    let sandbox = Sandbox { timeout: Duration::from_secs_f64(h.timeout), ..Default::default() };
    let pb = progress_bar(programs.len() as u64, "HumanEval run", quiet);
    let started = Instant::now();
    let outcomes = sandbox.run_until(&programs, interrupted, || pb.inc(1))?;
    let run_seconds = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    // Only what was generated and run counts.
    let ran: Vec<(usize, String, Outcome)> =
        generated.into_iter().zip(outcomes).filter_map(|((i, t), o)| o.map(|o| (i, t, o))).collect();
    let share = Share { ran, stats, run_seconds, rows: rows.min(my_requests.len()), interrupted: set(interrupted) };
    let shares = if group.world() > 1 { group.all_gather_json(&share)? } else { vec![share] };
    let mut ran: Vec<(usize, String, Outcome)> = shares.iter().flat_map(|s| s.ran.iter().cloned()).collect();
    ran.sort_by_key(|(i, _, _)| *i);
    let (completions, outcomes): (Vec<(usize, String)>, Vec<Outcome>) =
        ran.into_iter().map(|(i, t, o)| ((problem_of[i], t), o)).unzip();
    let mut record = humaneval::summarize(problems, &completions, &outcomes, samples, h.sampling.temperature);
    // The ranks work at once: the run takes as long as the slowest one.
    let mut generation = crate::generation::batch::BatchStats::default();
    shares.iter().for_each(|s| generation.merge(&s.stats));
    record.mode = mode.name().to_string();
    record.sandbox = sandbox.isolation().describe().to_string();
    record.interrupted = shares.iter().any(|s| s.interrupted);
    record.batch_rows = shares.iter().map(|s| s.rows).max().unwrap_or(0);
    record.generation_seconds = generation.seconds;
    record.run_seconds = shares.iter().map(|s| s.run_seconds).fold(0.0, f64::max);
    record.generated_tokens = generation.generated_tokens;
    record.generation_tok_s = generation.tok_s();
    Ok(record)
}

/// One rank's HumanEval completions (request index, text, outcome) and its timings.
#[derive(serde::Serialize, serde::Deserialize)]
struct Share {
    ran: Vec<(usize, String, Outcome)>,
    stats: crate::generation::batch::BatchStats,
    run_seconds: f64,
    rows: usize,
    interrupted: bool,
}

/// Rows decoded together at most when the batch size is `auto` (on an H200, TinyLlama's batched decode
/// graph still gains from 256 to 512 rows: 20-sample HumanEval 39.7 s → 38.5 s).
const MAX_GENERATION_ROWS: usize = 512;

/// Rows to decode together when the batch size is `auto`: what the KV cache of rows of `tokens` tokens leaves
/// of a quarter of the GPU's free memory, at most [`MAX_GENERATION_ROWS`]; 8 on the CPU.
pub fn generation_rows(loaded: &LoadedModel, tokens: usize) -> usize {
    let cfg = loaded.config();
    let per_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens.max(1) * 4;
    match crate::util::gpu_memory_free_bytes(loaded.model.device()) {
        Some(free) => (free / 4 / per_row.max(1)).clamp(1, MAX_GENERATION_ROWS),
        None => 8,
    }
}

/// HumanEval's canonical solutions (the first `limit`) run through the sandbox: each problem's task id and
/// outcome, for the problems run before `interrupted` was set.
pub fn humaneval_selfcheck(
    file: Option<&Path>,
    limit: Option<usize>,
    timeout: f64,
    quiet: bool,
    interrupted: &AtomicBool,
) -> Result<Vec<(String, Outcome)>> {
    let mut problems = match file {
        Some(file) => humaneval::load_file(file).context("--humaneval-file")?,
        None => datasets::humaneval_from_hub(quiet)?,
    };
    if let Some(n) = limit {
        problems.truncate(n);
    }
    let programs: Vec<String> = problems.iter().map(|p| humaneval::check_program(p, &p.canonical_solution)).collect();
    let sandbox = Sandbox { timeout: Duration::from_secs_f64(timeout), ..Default::default() };
    let pb = progress_bar(programs.len() as u64, "selfcheck", quiet);
    let outcomes = sandbox.run_until(&programs, interrupted, || pb.inc(1))?;
    pb.finish_and_clear();
    Ok(problems.into_iter().map(|p| p.task_id).zip(outcomes).filter_map(|(t, o)| o.map(|o| (t, o))).collect())
}

//! `billion bench`: MMLU, HumanEval and speed for one or more models, one after another, into
//! results/benchmark_results.{json,md} and results/benchmark_chart.svg.

use crate::bench::{datasets, humaneval, mmlu, report, speed};
use crate::generation::{generate, sampling::SamplingParams, GenerateParams};
use crate::model::device::{device_name, dtype_name};
use crate::model::{load, weights::Quantize, LoadOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models, comma-separated (anything --model takes)
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Run MMLU (all three evaluators run when none is named)
    #[arg(long)]
    pub mmlu: bool,
    #[arg(long)]
    pub humaneval: bool,
    #[arg(long)]
    pub speed: bool,
    /// Run HumanEval's canonical solutions through the sandbox and report how many pass
    #[arg(long)]
    pub humaneval_selfcheck: bool,
    /// MMLU folder in the hendrycks CSV layout (dev/, test/); default: cais/mmlu from the hub
    #[arg(long)]
    pub mmlu_dir: Option<PathBuf>,
    /// HumanEval problems (.jsonl or .jsonl.gz); default: openai/openai_humaneval from the hub
    #[arg(long)]
    pub humaneval_file: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// MMLU subjects, comma-separated (default: all)
    #[arg(long, value_delimiter = ',')]
    pub subjects: Option<Vec<String>>,
    /// At most this many questions per MMLU subject / HumanEval problems
    #[arg(long)]
    pub limit: Option<usize>,
    /// Recompute the few-shot prefix for every MMLU question (for comparison)
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// HumanEval completions per problem (pass@k for k ≤ samples)
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// HumanEval sampling temperature (0 = greedy)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Seconds per HumanEval program
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// Speed: prompt tokens (llama-bench -p)
    #[arg(short = 'p', long = "prefill", default_value_t = 512)]
    pub prefill: usize,
    /// Speed: generated tokens (llama-bench -n)
    #[arg(short = 'n', long = "decode", default_value_t = 128)]
    pub decode: usize,
    /// Speed: repetitions (llama-bench -r)
    #[arg(short = 'r', long = "reps", default_value_t = 5)]
    pub reps: usize,
    /// Quantization settings to compare, comma-separated: none, q8_0, q4_0, q4k
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub quantize: Vec<String>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long)]
    pub random_weights: bool,
    #[arg(long, default_value = "results")]
    pub results_dir: PathBuf,
    /// Print this run's results as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

fn bar(len: u64, what: &str, json: bool) -> ProgressBar {
    let b = ProgressBar::new(len);
    if json || !std::io::stderr().is_terminal() {
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

pub fn run(a: BenchArgs) -> Result<()> {
    if a.humaneval_selfcheck {
        let problems = match &a.humaneval_file {
            Some(file) => humaneval::load_file(file)?,
            None => datasets::humaneval_from_hub(a.json)?,
        };
        let programs: Vec<String> =
            problems.iter().map(|p| humaneval::check_program(p, &p.canonical_solution)).collect();
        let sandbox =
            humaneval::Sandbox { timeout: std::time::Duration::from_secs_f64(a.timeout), ..Default::default() };
        let pb = bar(programs.len() as u64, "selfcheck", a.json);
        let outcomes = sandbox.run_all(&programs, || pb.inc(1))?;
        pb.finish_and_clear();
        let passed = outcomes.iter().filter(|o| **o == humaneval::Outcome::Passed).count();
        for (p, o) in problems.iter().zip(&outcomes) {
            if *o != humaneval::Outcome::Passed {
                eprintln!("{}: {o:?}", p.task_id);
            }
        }
        println!("{passed}/{} canonical solutions pass", problems.len());
        if passed != problems.len() {
            bail!("{} canonical solutions failed", problems.len() - passed);
        }
        return Ok(());
    }
    if a.models.is_empty() {
        bail!("--models: name at least one model");
    }
    let all = !a.mmlu && !a.humaneval && !a.speed;
    let (do_mmlu, do_he, do_speed) = (a.mmlu || all, a.humaneval || all, a.speed || all);
    let subjects = match (do_mmlu, &a.mmlu_dir) {
        (false, _) => vec![],
        (true, Some(dir)) => mmlu::load_dir(dir, a.subjects.as_deref())?,
        (true, None) => {
            let mut all =
                datasets::mmlu_from_hub(a.json).context("MMLU from the hub (cais/mmlu); or pass --mmlu-dir")?;
            if let Some(only) = &a.subjects {
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
    let problems = if do_he {
        let mut p = match &a.humaneval_file {
            Some(file) => humaneval::load_file(file)?,
            None => datasets::humaneval_from_hub(a.json)
                .context("HumanEval from the hub (openai/openai_humaneval); or pass --humaneval-file")?,
        };
        if let Some(n) = a.limit {
            p.truncate(n);
        }
        p
    } else {
        vec![]
    };
    let quantize: Vec<Option<Quantize>> = a.quantize.iter().map(|q| Quantize::parse(q)).collect::<Result<_>>()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::Relaxed) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: finishing the current step and keeping what is done (Ctrl-C again to quit now)");
        });
    }
    let groups = mmlu::subject_groups();
    let mut run_records = vec![];
    'models: for name in &a.models {
        for q in &quantize {
            if interrupted.load(Ordering::Relaxed) {
                break 'models;
            }
            let opts = LoadOptions {
                device: a.device.clone(),
                dtype: a.dtype.clone(),
                quantize: *q,
                random_weights: a.random_weights,
                dequantize: false,
            };
            let loaded = load(name, &opts).with_context(|| format!("loading {name}"))?;
            let cfg = loaded.config().clone();
            let gpu = loaded.model.device().clone();
            let mut gpu_peak = crate::util::gpu_memory_used_bytes(&gpu);
            let mut sample_gpu = || {
                if let Some(now) = crate::util::gpu_memory_used_bytes(&gpu) {
                    gpu_peak = Some(gpu_peak.unwrap_or(0).max(now));
                }
            };
            let mut record = json!({
                "name": name, "source": loaded.source.display().to_string(), "format": loaded.format,
                "architecture": cfg.architecture.name(), "parameters": cfg.parameter_count(),
                "dtype": dtype_name(loaded.model.dtype()), "quantization": loaded.quantization,
                "device": device_name(loaded.model.device()), "date_unix": report::now(),
                "load_s": loaded.load_seconds, "weights_bytes": loaded.model.weight_bytes(),
            });
            if do_speed && !interrupted.load(Ordering::Relaxed) {
                let pb = bar(2, "speed", a.json);
                let r = speed::measure(&loaded.model, a.prefill, a.decode, a.reps)?;
                sample_gpu();
                pb.finish_and_clear();
                let ttft = speed::time_prefill(&loaded.model, a.prefill.max(1))? * 1000.0;
                record["speed"] = json!({"prefill": r.prefill, "decode": r.decode, "ttft_ms": ttft, "prompt_tokens": a.prefill, "generated_tokens": a.decode, "reps": a.reps});
            }
            if do_mmlu && !interrupted.load(Ordering::Relaxed) {
                let total: usize = subjects.iter().map(|s| a.limit.unwrap_or(s.test.len()).min(s.test.len())).sum();
                let pb = bar(total as u64, "MMLU", a.json);
                let start = Instant::now();
                let (res, details) =
                    mmlu::evaluate(&loaded, &subjects, a.shots, a.limit, &groups, !a.no_prefix_reuse, |n| {
                        pb.inc(n as u64)
                    })?;
                pb.finish_and_clear();
                let secs = start.elapsed().as_secs_f64();
                let n: usize = res.iter().map(|r| r.questions).sum();
                let correct: usize = res.iter().map(|r| r.correct).sum();
                let mut by_group = serde_json::Map::new();
                for g in ["stem", "humanities", "social_sciences", "other"] {
                    let (gn, gc) =
                        res.iter().filter(|r| r.group == g).fold((0, 0), |(n, c), r| (n + r.questions, c + r.correct));
                    if gn > 0 {
                        by_group.insert(
                            g.into(),
                            json!({"questions": gn, "correct": gc, "accuracy": gc as f64 / gn as f64}),
                        );
                    }
                }
                let mean_ll =
                    res.iter().map(|r| r.mean_loglik_correct * r.questions as f64).sum::<f64>() / n.max(1) as f64;
                let per_q: serde_json::Map<String, serde_json::Value> = details
                    .into_iter()
                    .map(|(s, q)| (s, json!(q.iter().map(|r| r.predicted).collect::<Vec<_>>())))
                    .collect();
                record["mmlu"] = json!({
                    "shots": a.shots, "questions": n, "correct": correct, "accuracy": correct as f64 / n.max(1) as f64,
                    "mean_loglik_correct": mean_ll, "groups": by_group, "subjects": res, "predictions": per_q,
                    "seconds": secs, "questions_per_s": n as f64 / secs.max(1e-9), "prefix_reuse": !a.no_prefix_reuse,
                });
            }
            if do_he && !interrupted.load(Ordering::Relaxed) {
                record["humaneval"] = run_humaneval(&a, &loaded, &problems, &interrupted)?;
            }
            sample_gpu();
            record["peak_rss_bytes"] = json!(crate::util::peak_rss_bytes());
            // Sampled after each step: the card's memory in use (all processes), at its highest.
            record["gpu_memory_peak_bytes"] = json!(gpu_peak);
            report::save(&a.results_dir, record.clone())?;
            run_records.push(record);
            drop(loaded); // free this model before loading the next
        }
    }
    let doc = report::load(&a.results_dir.join("benchmark_results.json"))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"schema_version": report::SCHEMA_VERSION, "models": run_records}))?
        );
    } else {
        print!("{}", report::summary_table(&doc));
        eprintln!("results in {}", a.results_dir.display());
    }
    Ok(())
}

fn run_humaneval(
    a: &BenchArgs,
    loaded: &crate::model::LoadedModel,
    problems: &[humaneval::Problem],
    interrupted: &AtomicBool,
) -> Result<serde_json::Value> {
    let tok = loaded.tokenizer()?;
    let samples = a.samples.max(1);
    let pb = bar((problems.len() * samples) as u64, "HumanEval gen", a.json);
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
            let budget = a.max_tokens.min(window / 2);
            if ids.len() + budget > window {
                ids.drain(..ids.len() + budget - window);
            }
            let sampling =
                SamplingParams { temperature: a.temperature, seed: (pi * 1000 + s) as u64, ..Default::default() };
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
    let sandbox = humaneval::Sandbox { timeout: std::time::Duration::from_secs_f64(a.timeout), ..Default::default() };
    let pb = bar(programs.len() as u64, "HumanEval run", a.json);
    let outcomes = sandbox.run_all(&programs, || pb.inc(1))?;
    pb.finish_and_clear();
    let mut per_problem = vec![];
    let mut pass1 = 0.0;
    let mut pass10 = vec![];
    for (pi, p) in problems.iter().enumerate() {
        let mine: Vec<(&String, &humaneval::Outcome)> =
            completions.iter().zip(&outcomes).filter(|((i, _), _)| *i == pi).map(|((_, c), o)| (c, o)).collect();
        if mine.is_empty() {
            continue;
        }
        let c = mine.iter().filter(|(_, o)| **o == humaneval::Outcome::Passed).count();
        pass1 += humaneval::pass_at_k(mine.len(), c, 1);
        if mine.len() >= 10 {
            pass10.push(humaneval::pass_at_k(mine.len(), c, 10));
        }
        per_problem.push(json!({"task_id": p.task_id, "samples": mine.len(), "passed": c, "outcomes": mine.iter().map(|(_, o)| o).collect::<Vec<_>>(), "completion": mine[0].0}));
    }
    let n = per_problem.len().max(1) as f64;
    Ok(json!({
        "problems": per_problem.len(), "samples": samples, "temperature": a.temperature, "pass_at_1": pass1 / n,
        "pass_at_10": if pass10.is_empty() { serde_json::Value::Null } else { json!(pass10.iter().sum::<f64>() / pass10.len() as f64) },
        "per_problem": per_problem,
    }))
}

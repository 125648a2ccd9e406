//! `billion bench`: MMLU, HumanEval and speed for one or more models, one after another, into
//! results/benchmark_results.{json,md} and results/benchmark_chart.svg. Parses the flags into
//! [`BenchParams`] and hands them to [`crate::bench::run`]; the printers are in [`crate::bench::report`].

use super::args::{load_flagged, quantize_list};
use super::{DeviceArgs, DistArgs, SamplingArgs};
use crate::bench::humaneval::Outcome;
use crate::bench::params::{BenchParams, Evaluators, HumanEvalMode, HumanEvalParams, MmluParams, SpeedParams};
use crate::bench::report;
use crate::bench::run::{self as bench_run, Datasets};
use crate::dist::{Group, Launch};
use crate::load::{resolve, LoadOptions, ModelSource};
use crate::model::quant::QuantizeChoice;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models, comma-separated (anything --model takes); every one is checked before the first is run
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Run MMLU (all three evaluators run when none is named)
    #[arg(long)]
    pub mmlu: bool,
    /// Run HumanEval: generate completions and run them in the sandbox (pass@1, pass@10)
    #[arg(long)]
    pub humaneval: bool,
    /// Run the speed test (prefill and decode tokens/s, time to the first token)
    #[arg(long)]
    pub speed: bool,
    /// Run HumanEval's canonical solutions (the first --limit) through the sandbox and report how many pass
    #[arg(long)]
    pub humaneval_selfcheck: bool,
    /// MMLU folder in the hendrycks CSV layout (dev/, test/); default: cais/mmlu from the hub
    #[arg(long)]
    pub mmlu_dir: Option<PathBuf>,
    /// HumanEval problems (.jsonl or .jsonl.gz); default: openai/openai_humaneval from the hub
    #[arg(long)]
    pub humaneval_file: Option<PathBuf>,
    /// MMLU: solved dev-set examples before each question (few-shot); at most the dev set's rows (5)
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// MMLU subjects, comma-separated (default: all)
    #[arg(long, value_delimiter = ',')]
    pub subjects: Option<Vec<String>>,
    /// At most this many questions per MMLU subject / HumanEval problems (≥ 1)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Recompute the few-shot prefix for every MMLU question (for comparison; one question at a time)
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// Rows per forward pass: MMLU questions scored together, HumanEval completions decoded together (finished
    /// ones refilled from the queue); a number, or `auto` (as many as the device's memory fits; MMLU on the CPU:
    /// one at a time, which is fastest there); 1 runs one at a time
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    pub batch_size: crate::bench::mmlu::BatchSize,
    /// HumanEval completions per problem (pass@k for k ≤ samples). More than 1 needs --temperature > 0:
    /// greedy decoding would give the same completion every time, so it is refused
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// HumanEval sampling (greedy unless --temperature is given)
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Most tokens per HumanEval completion (at most half the model's context window); 512 by default, the
    /// HumanEval harnesses' generation length, so that whole functions fit
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Seconds each HumanEval program may run in the sandbox
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// HumanEval prompting: auto (instruct for models with a chat template, base otherwise), base (continue
    /// the prompt) or instruct (the prompt as a chat message, the code taken from the reply's code block)
    #[arg(long, value_enum, default_value_t = HumanEvalMode::Auto)]
    pub humaneval_mode: HumanEvalMode,
    /// Speed: prompt tokens per prefill, llama-bench's -p (here -p is --prefill, not --prompt)
    #[arg(short = 'p', long = "prefill", default_value_t = 512)]
    pub prefill: usize,
    /// Speed: generated tokens per decode run (llama-bench -n)
    #[arg(short = 'n', long = "decode", default_value_t = 128)]
    pub decode: usize,
    /// Speed: repetitions, ≥ 1, after one warm-up (llama-bench -r)
    #[arg(short = 'r', long = "reps", default_value_t = 5)]
    pub reps: usize,
    /// Quantization settings to compare, comma-separated: none, q8_0, q4_0, q4k (safetensors models)
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub quantize: Vec<QuantizeChoice>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Use random weights of the config's exact shapes (no weight files needed)
    #[arg(long)]
    pub random_weights: bool,
    /// Folder for benchmark_results.{json,md} and benchmark_chart.svg, updated in place: other models'
    /// results are kept (a folder, unlike the --results FILE of other subcommands)
    #[arg(long, default_value = "results")]
    pub results_dir: PathBuf,
    /// Print this run's results as JSON on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dist: DistArgs,
}

impl BenchArgs {
    /// The run these flags ask for; values that would measure nothing or mislead are refused here, before any
    /// work starts.
    pub fn params(&self) -> Result<BenchParams> {
        let sampling = self.sampling.params()?;
        if self.limit == Some(0) {
            bail!("--limit must be at least 1 (0 would score no question)");
        }
        if self.reps == 0 {
            bail!("-r/--reps must be at least 1");
        }
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.samples > 1 && sampling.temperature == 0.0 {
            bail!(
                "--samples {} at --temperature 0 would give {} identical greedy completions; give a temperature > 0 (e.g. 0.8) for pass@k, or --samples 1",
                self.samples,
                self.samples
            );
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a number of seconds > 0, got {}", self.timeout);
        }
        Ok(BenchParams {
            models: self.models.clone(),
            evaluators: Evaluators::named_or_all(self.speed, self.mmlu, self.humaneval),
            mmlu: MmluParams {
                dir: self.mmlu_dir.clone(),
                subjects: self.subjects.clone(),
                shots: self.shots,
                limit: self.limit,
                prefix_reuse: !self.no_prefix_reuse,
            },
            batch_size: self.batch_size,
            humaneval: HumanEvalParams {
                file: self.humaneval_file.clone(),
                limit: self.limit,
                samples: self.samples,
                sampling,
                max_tokens: self.max_tokens,
                timeout: self.timeout,
                mode: self.humaneval_mode,
            },
            speed: SpeedParams { prefill: self.prefill, decode: self.decode, reps: self.reps },
            quantize: quantize_list(&self.quantize),
            load: LoadOptions {
                device: self.device.device,
                dtype: self.device.dtype,
                quantize: None,
                random_weights: self.random_weights,
                dequantize: false,
            },
            results_dir: self.results_dir.clone(),
            json: self.json,
        })
    }
}

/// Ctrl-C sets the flag (the current question or problem finishes and what is done is kept); a second Ctrl-C
/// quits at once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            crate::bench::humaneval::kill_running_programs();
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing the current question or problem and keeping what is done (Ctrl-C again to quit now)");
    });
    interrupted
}

/// Everything that could fail after the first model has run, checked before: every model name resolves, no
/// GGUF file is to be quantized, and the results folder is writable with a readable results file.
fn preflight(params: &BenchParams) -> Result<()> {
    for name in &params.models {
        let source = resolve(name, params.load.random_weights).context("--models")?;
        if matches!(source, ModelSource::Gguf(_)) && params.quantize.iter().any(|q| q.is_some()) {
            bail!("--quantize: {name} is a GGUF file, already quantized; quantizing at load applies to safetensors weights");
        }
    }
    let dir = &params.results_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("--results-dir {}: cannot create it", dir.display()))?;
    tempfile::NamedTempFile::new_in(dir).with_context(|| format!("--results-dir {}: not writable", dir.display()))?;
    report::load(&dir.join("benchmark_results.json")).context("--results-dir")?;
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let interrupted = interrupt_flag();
    if a.humaneval_selfcheck {
        if a.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        if !(a.timeout.is_finite() && a.timeout > 0.0) {
            bail!("--timeout must be a number of seconds > 0, got {}", a.timeout);
        }
        let results =
            bench_run::humaneval_selfcheck(a.humaneval_file.as_deref(), a.limit, a.timeout, a.json, &interrupted)?;
        let passed = results.iter().filter(|(_, o)| *o == Outcome::Passed).count();
        for (task_id, o) in &results {
            if *o != Outcome::Passed {
                eprintln!("{task_id}: {o:?}");
            }
        }
        println!("{passed}/{} canonical solutions pass", results.len());
        if interrupted.load(Ordering::Relaxed) {
            eprintln!("interrupted: only the first {} solutions were run", results.len());
            std::process::exit(130);
        }
        if passed != results.len() {
            bail!("{} canonical solutions failed", results.len() - passed);
        }
        return Ok(());
    }
    if a.models.is_empty() {
        bail!("--models: name at least one model");
    }
    let params = a.params()?;
    let launch = a.dist.launch(params.load.device)?;
    let main_process = !matches!(&launch, Launch::Process { me, .. } if me.rank != 0);
    if main_process {
        preflight(&params)?;
    }
    let data = Datasets::load(&params)?;
    let work = |group: &mut Group, device| {
        let load = |name: &str, opts: &LoadOptions| load_flagged(name, &LoadOptions { device, ..opts.clone() });
        bench_run::run_rank(&params, &data, load, &interrupted, group)
    };
    let summary = crate::dist::run(&launch, &work)?;
    if !main_process {
        eprintln!("this rank's share of the benchmarks is done; rank 0 writes the results");
        return Ok(());
    }
    let doc = report::load(&params.results_dir.join("benchmark_results.json"))?;
    if params.json {
        println!("{}", report::json_document(&summary.records)?);
    } else {
        print!("{}", report::summary_table(&report::records(&doc)?));
        eprintln!("results in {}", params.results_dir.display());
    }
    if interrupted.load(Ordering::Relaxed) {
        // Nothing left out goes unsaid.
        for r in summary.records.iter().filter(|r| r.interrupted) {
            let mut parts = vec![];
            if let Some(m) = r.mmlu.as_ref().filter(|m| m.interrupted) {
                parts.push(format!("MMLU stopped after {} questions", m.questions));
            }
            if let Some(h) = r.humaneval.as_ref().filter(|h| h.interrupted) {
                parts.push(format!("HumanEval stopped after {} problems", h.problems));
            }
            if !r.not_run.is_empty() {
                parts.push(format!("not run: {}", r.not_run.join(", ")));
            }
            if !parts.is_empty() {
                eprintln!("interrupted: {} ({}): {}", r.name, r.quantization, parts.join("; "));
            }
        }
        if !summary.not_started.is_empty() {
            eprintln!("interrupted: not run: {}", summary.not_started.join(", "));
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(130);
    }
    Ok(())
}

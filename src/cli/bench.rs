//! `billion bench`: MMLU, HumanEval and speed for one or more models, one after another, into
//! results/benchmark_results.{json,md} and results/benchmark_chart.svg. Parses the flags into
//! [`BenchParams`] and hands them to [`crate::bench::run`]; the printers are in [`crate::bench::report`].

use super::args::{load_flagged, quantize_list};
use super::{DeviceArgs, SamplingArgs};
use crate::bench::humaneval::Outcome;
use crate::bench::params::{BenchParams, Evaluators, HumanEvalParams, MmluParams, SpeedParams};
use crate::bench::report;
use crate::bench::run::{self as bench_run, Datasets};
use crate::load::LoadOptions;
use crate::model::quant::QuantizeChoice;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models, comma-separated (anything --model takes)
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Run MMLU (all three evaluators run when none is named)
    #[arg(long)]
    pub mmlu: bool,
    /// Run HumanEval
    #[arg(long)]
    pub humaneval: bool,
    /// Run the speed test (prefill and decode tokens/s, time to the first token)
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
    /// MMLU: solved examples before each question (few-shot)
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
    /// HumanEval sampling (greedy unless --temperature is given)
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Most tokens per HumanEval completion (at most half the model's context window)
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
    pub quantize: Vec<QuantizeChoice>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Use random weights of the config's exact shapes (no weight files needed)
    #[arg(long)]
    pub random_weights: bool,
    /// Folder for benchmark_results.{json,md} and benchmark_chart.svg (other models' results are kept)
    #[arg(long, default_value = "results")]
    pub results_dir: PathBuf,
    /// Print this run's results as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The run these flags ask for (sampling flags validated).
    pub fn params(&self) -> Result<BenchParams> {
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
            humaneval: HumanEvalParams {
                file: self.humaneval_file.clone(),
                limit: self.limit,
                samples: self.samples,
                sampling: self.sampling.params()?,
                max_tokens: self.max_tokens,
                timeout: self.timeout,
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

/// Ctrl-C sets the flag (the current step finishes and what is done is kept); a second Ctrl-C quits at once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing the current step and keeping what is done (Ctrl-C again to quit now)");
    });
    interrupted
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.humaneval_selfcheck {
        let results = bench_run::humaneval_selfcheck(a.humaneval_file.as_deref(), a.timeout, a.json)?;
        let passed = results.iter().filter(|(_, o)| *o == Outcome::Passed).count();
        for (task_id, o) in &results {
            if *o != Outcome::Passed {
                eprintln!("{task_id}: {o:?}");
            }
        }
        println!("{passed}/{} canonical solutions pass", results.len());
        if passed != results.len() {
            bail!("{} canonical solutions failed", results.len() - passed);
        }
        return Ok(());
    }
    if a.models.is_empty() {
        bail!("--models: name at least one model");
    }
    let params = a.params()?;
    let data = Datasets::load(&params)?;
    let interrupted = interrupt_flag();
    let records = bench_run::run(&params, &data, load_flagged, &interrupted)?;
    let doc = report::load(&params.results_dir.join("benchmark_results.json"))?;
    if params.json {
        println!("{}", report::json_document(&records)?);
    } else {
        print!("{}", report::summary_table(&report::records(&doc)?));
        eprintln!("results in {}", params.results_dir.display());
    }
    Ok(())
}

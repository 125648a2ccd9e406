//! What one `billion bench` run does: the models, the evaluators and their settings (llama-bench's
//! parameters, before they become runs).

use crate::generation::sampling::SamplingParams;
use crate::load::LoadOptions;
use crate::model::quant::Quantize;
use std::path::PathBuf;

/// Which evaluators run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluators {
    pub speed: bool,
    pub mmlu: bool,
    pub humaneval: bool,
}

impl Evaluators {
    /// The ones named; all three when none is.
    pub fn named_or_all(speed: bool, mmlu: bool, humaneval: bool) -> Self {
        let all = !speed && !mmlu && !humaneval;
        Self { speed: speed || all, mmlu: mmlu || all, humaneval: humaneval || all }
    }
}

#[derive(Debug, Clone)]
pub struct MmluParams {
    /// A folder in the hendrycks CSV layout (dev/, test/); None: cais/mmlu from the hub.
    pub dir: Option<PathBuf>,
    /// Only these subjects (None: all).
    pub subjects: Option<Vec<String>>,
    pub shots: usize,
    /// At most this many test questions per subject.
    pub limit: Option<usize>,
    /// Share the few-shot prefix's KV cache between a subject's questions.
    pub prefix_reuse: bool,
}

/// How HumanEval asks a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HumanEvalMode {
    /// Instruct for models with a chat template, base for the others.
    #[default]
    Auto,
    /// Continue the prompt (the paper's harness).
    Base,
    /// Send the prompt as a chat message, take the code from the reply (evalplus, bigcode "instruct").
    Instruct,
}

impl HumanEvalMode {
    /// The mode used for a model: `Base` or `Instruct`.
    pub fn resolve(self, has_chat_template: bool) -> Self {
        match self {
            HumanEvalMode::Auto if has_chat_template => HumanEvalMode::Instruct,
            HumanEvalMode::Auto => HumanEvalMode::Base,
            m => m,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HumanEvalMode::Auto => "auto",
            HumanEvalMode::Base => "base",
            HumanEvalMode::Instruct => "instruct",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HumanEvalParams {
    /// A .jsonl or .jsonl.gz file; None: openai/openai_humaneval from the hub.
    pub file: Option<PathBuf>,
    /// At most this many problems.
    pub limit: Option<usize>,
    /// Completions per problem.
    pub samples: usize,
    /// Each completion's seed is this seed plus `problem × 1000 + sample`.
    pub sampling: SamplingParams,
    /// Most tokens per completion (at most half the model's context window).
    pub max_tokens: usize,
    /// Seconds per program in the sandbox.
    pub timeout: f64,
    pub mode: HumanEvalMode,
}

/// llama-bench's `-p`, `-n` and `-r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeedParams {
    pub prefill: usize,
    pub decode: usize,
    pub reps: usize,
}

#[derive(Debug, Clone)]
pub struct BenchParams {
    /// Model names as `load` takes them; each runs once per entry of `quantize`.
    pub models: Vec<String>,
    pub evaluators: Evaluators,
    pub mmlu: MmluParams,
    /// MMLU questions per forward pass, HumanEval completions decoded together.
    pub batch_size: super::mmlu::BatchSize,
    pub humaneval: HumanEvalParams,
    pub speed: SpeedParams,
    /// The quantizations to compare (None: as stored).
    pub quantize: Vec<Option<Quantize>>,
    /// Device, dtype and random weights; `quantize` is set per run.
    pub load: LoadOptions,
    /// Where benchmark_results.{json,md} and benchmark_chart.svg are kept.
    pub results_dir: PathBuf,
    /// Machine-readable output: no progress bars, quiet downloads.
    pub json: bool,
}

impl BenchParams {
    /// The load options of one run.
    pub fn load_options(&self, quantize: Option<Quantize>) -> LoadOptions {
        LoadOptions { quantize, dequantize: false, ..self.load.clone() }
    }

    /// What every data-parallel rank must agree on: everything that changes a record, but not where the
    /// files are, the device or how progress is shown.
    pub fn signature(&self) -> String {
        let (m, h) = (&self.mmlu, &self.humaneval);
        format!(
            "{:?} {:?} mmlu {:?} {} {:?} {} batch {:?} humaneval {:?} {} {:?} {} {} {:?} speed {:?} {:?} {:?} {}",
            self.models,
            self.evaluators,
            m.subjects,
            m.shots,
            m.limit,
            m.prefix_reuse,
            self.batch_size,
            h.limit,
            h.samples,
            h.sampling,
            h.max_tokens,
            h.timeout,
            h.mode,
            self.speed,
            self.quantize,
            self.load.dtype,
            self.load.random_weights
        )
    }
}

//! A fine-tuning run end to end: checks first (settings, output paths, resume state, data), then the model, the data
//! tokenized, the base model evaluated, LoRA training (resumable from a checkpoint, stoppable with one),
//! the adapter saved in PEFT format, the fine-tuned model evaluated, optionally a merged model, and a typed
//! [`FinetuneRecord`] (also added to the results file). What a front end shows while it runs, and how it
//! loads the model, come through [`RunHooks`].

use super::data::{self, Example, Renderer, Tokenized};
use super::files;
use super::merge;
use super::train::{self, evaluate, EvalMetrics, Outcome, StepRecord, TrainSettings, Trainer, TrainerState};
use crate::dist::Group;
use crate::load::device::{device_name, dtype_name};
use crate::load::{LoadOptions, LoadedModel, ModelSource};
use crate::model::adapter::{Lora, LoraConfig};
use crate::model::Architecture;
use crate::util::human_bytes;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Targets {
    /// The architecture's usual choice (q_proj and v_proj; query_key_value for GPT-NeoX).
    #[default]
    Default,
    /// Every linear layer of the blocks.
    All,
    /// These layers, by their short names (`q_proj`), checked against the model.
    Named(Vec<String>),
}

impl Targets {
    /// From a list of names; `all` (or `all-linear`) among them means every linear layer.
    pub fn from_names(names: &[String]) -> Self {
        if names.iter().any(|t| t == "all" || t == "all-linear") {
            Targets::All
        } else {
            Targets::Named(names.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
        }
    }

    /// The short layer names the adapter goes on, checked against the model's linear layers (full names).
    pub fn resolve(&self, arch: Architecture, layer_names: &[String]) -> Result<Vec<String>> {
        let mut short: Vec<String> =
            layer_names.iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect();
        short.sort();
        short.dedup();
        let wanted: Vec<String> = match self {
            Targets::Default => arch.spec().default_lora_targets.iter().map(|t| t.to_string()).collect(),
            Targets::All => return Ok(short),
            Targets::Named(names) => names.clone(),
        };
        for t in &wanted {
            if !short.contains(t) {
                anyhow::bail!("this model has no linear layer named {t} (it has: {}, or `all`)", short.join(", "));
            }
        }
        Ok(wanted)
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct FinetuneParams {
    /// The base model: a Hugging Face folder, a .gguf file, a config.json (random weights) or a hub name.
    pub model: String,
    pub load: LoadOptions,
    /// Training data, JSONL; None: the built-in review-sentiment task (which brings its own held-out set).
    pub data: Option<PathBuf>,
    /// Held-out data, JSONL; None: `eval_split` of `data` is held out.
    pub eval_data: Option<PathBuf>,
    /// Share of `data` held out when `eval_data` is not given, in [0, 1).
    pub eval_split: f64,
    /// The hyperparameters. Their `targets` are not read: the adapter goes on `targets`, resolved against the
    /// model. A resumed run uses the checkpoint's settings instead.
    pub settings: TrainSettings,
    pub targets: Targets,
    /// Stop after this many optimizer steps (the schedule spans the shorter of this and the epochs).
    pub max_steps: Option<usize>,
    /// Activation checkpointing: less memory for activations, one more forward pass of the layers per step
    /// (the same gradients).
    pub checkpointing: bool,
    /// Where the adapter goes (and `checkpoint/` while training, `merged/` or `merged.gguf` with `merge`).
    pub out: PathBuf,
    /// Also write the base model with the adapter merged in.
    pub merge: bool,
    /// Continue from this checkpoint folder (`out/checkpoint` of an interrupted run).
    pub resume: Option<PathBuf>,
    /// Held-out examples whose generations are kept before and after.
    pub show: usize,
    /// Results file the record is added to (one record per model, device, quantization and targets).
    pub results: Option<PathBuf>,
    /// Test hook: make the loss of this step NaN, as a diverging run would.
    pub inject_nan_at_step: Option<usize>,
    /// Test hook: wait this long between a checkpoint or merged model written in full and its rename into
    /// place (a test stops the process there).
    pub pause_in_save: Option<Duration>,
}

/// What a front end takes part in: loading the model, lines for the user, and the training steps. Every
/// method has a quiet default.
pub trait RunHooks {
    /// Load the base model (a front end may add its own context to the errors).
    fn load(&mut self, model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
        crate::load::load(model, opts)
    }

    /// A line for the user: what is being done, notes about the data.
    fn note(&mut self, _line: &str) {}

    /// Training is about to run from `step` (more than 0 when resumed) to `total`. Returns the flag that, once
    /// set, stops training after the current step with a checkpoint (the CLI sets it on Ctrl-C).
    fn training_started(&mut self, _step: usize, _total: usize) -> Result<Arc<AtomicBool>> {
        Ok(Arc::new(AtomicBool::new(false)))
    }

    /// An optimizer step finished.
    fn step(&mut self, _record: &StepRecord, _total: usize) {}

    /// Training stopped (finished, interrupted or failed).
    fn training_finished(&mut self) {}
}

/// Hooks that load with [`crate::load::load`] and show nothing.
pub struct Quiet;

impl RunHooks for Quiet {}

/// The input of a run that an error is about, so that a front end can name it its own way (a flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Model,
    Data,
    EvalData,
    EvalSplit,
    Targets,
    MaxSteps,
    MaxLen,
    Out,
    Merge,
    Resume,
    Results,
    /// One of the [`TrainSettings`], by its field name (`lr`, `batch_size`).
    Setting(&'static str),
}

/// An error about one [`Input`]; it reads as the error it wraps.
#[derive(Debug)]
pub struct InputError {
    pub input: Input,
    pub error: anyhow::Error,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the outermost message: the rest of the chain is `source`.
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for InputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

fn input_error(input: Input, error: impl Into<anyhow::Error>) -> anyhow::Error {
    InputError { input, error: error.into() }.into()
}

trait About<T> {
    fn about(self, input: Input) -> Result<T>;
}

impl<T> About<T> for Result<T> {
    fn about(self, input: Input) -> Result<T> {
        self.map_err(|e| input_error(input, e))
    }
}

/// Training was stopped through the flag of [`RunHooks::training_started`]; the checkpoint continues it.
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub total: usize,
    pub checkpoint: PathBuf,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted at step {} of {}; checkpoint saved in {}",
            self.step,
            self.total,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// A held-out example whose generations the record keeps: its last prompt message and the expected answer.
#[derive(Debug, Clone, Default)]
pub struct ShownExample {
    pub prompt: String,
    pub expected: String,
}

/// One finished run, as the results file and `--json` report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneRecord {
    pub schema_version: u32,
    /// Seconds since the Unix epoch.
    pub timestamp: u64,
    pub model: String,
    pub architecture: String,
    pub quantization: String,
    pub device: String,
    pub dtype: String,
    /// The training data's name (a path, or the built-in task).
    pub data: String,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub settings: TrainSettings,
    /// Whether activation checkpointing was on (it changes memory and time, not the gradients).
    #[serde(default)]
    pub checkpointing: bool,
    pub steps: usize,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub trainable_share: f64,
    /// Mean over steady-state steps (the first, which includes one-time setup, is left out).
    pub step_time_ms: f64,
    pub train_tokens_per_s: f64,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory in use on the card while training (all processes).
    pub peak_gpu_memory_bytes: Option<u64>,
    /// Peak GPU memory this process allocated.
    pub peak_gpu_allocated_bytes: Option<u64>,
    pub loss_curve: Vec<StepRecord>,
    /// Data-parallel ranks that trained (1: one device).
    #[serde(default = "train::one_rank")]
    pub world_size: usize,
    /// Each rank's share when several trained (empty for one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankRecord>,
    pub before: EvalMetrics,
    pub after: EvalMetrics,
    /// The adapter folder.
    pub adapter: PathBuf,
    /// The merged model, when asked for.
    pub merged: Option<PathBuf>,
    /// The held-out examples whose generations `before` and `after` hold (not in the JSON).
    #[serde(skip)]
    pub shown: Vec<ShownExample>,
}

/// One data-parallel rank's part of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankRecord {
    pub rank: usize,
    pub device: String,
    /// Mean loss over the answer tokens this rank trained on.
    pub loss: f64,
    pub tokens: usize,
    pub train_seconds: f64,
    pub train_tokens_per_s: f64,
    pub peak_gpu_allocated_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
}

impl FinetuneRecord {
    /// Before/after metrics as a Markdown table, then the shown examples side by side.
    pub fn metrics_table(&self) -> String {
        let (before, after) = (&self.before, &self.after);
        let mut s = String::new();
        s.push_str(&format!("held-out evaluation ({} examples)\n", after.examples));
        s.push_str("| metric | before | after |\n| --- | --- | --- |\n");
        s.push_str(&format!("| loss | {:.4} | {:.4} |\n", before.loss, after.loss));
        s.push_str(&format!("| perplexity | {:.3} | {:.3} |\n", before.perplexity, after.perplexity));
        s.push_str(&format!(
            "| answer-token accuracy | {:.1}% | {:.1}% |\n",
            100.0 * before.token_accuracy,
            100.0 * after.token_accuracy
        ));
        s.push_str(&format!(
            "| exact match | {:.1}% | {:.1}% |\n",
            100.0 * before.exact_match,
            100.0 * after.exact_match
        ));
        let clip = |t: &str| {
            let one = t.replace('\n', "⏎");
            if one.chars().count() > 60 {
                format!("{}…", one.chars().take(60).collect::<String>())
            } else {
                one
            }
        };
        let n = before.generations.len().min(after.generations.len());
        for (i, ex) in self.shown.iter().enumerate().take(n) {
            s.push_str(&format!("\nexample {}: {}\n", i + 1, clip(&ex.prompt)));
            s.push_str(&format!("  expected: {}\n", clip(&ex.expected)));
            s.push_str(&format!("  before:   {}\n", clip(&before.generations[i])));
            s.push_str(&format!("  after:    {}\n", clip(&after.generations[i])));
        }
        s
    }

    /// The human-readable summary: the metrics table, speed and memory, and where the adapter is.
    pub fn summary(&self) -> String {
        let gpu = match (self.peak_gpu_allocated_bytes, self.peak_gpu_memory_bytes) {
            (Some(a), Some(c)) => {
                format!(", peak GPU memory allocated {} (card in use {})", human_bytes(a), human_bytes(c))
            }
            (None, Some(c)) => format!(", GPU memory in use {}", human_bytes(c)),
            _ => String::new(),
        };
        let ranks: String = self
            .ranks
            .iter()
            .map(|r| {
                format!(
                    "\n  rank {} ({}): loss {:.4}, {} tokens, {:.0} tok/s{}",
                    r.rank,
                    r.device,
                    r.loss,
                    r.tokens,
                    r.train_tokens_per_s,
                    r.peak_gpu_allocated_bytes
                        .map(|b| format!(", peak GPU allocated {}", human_bytes(b)))
                        .unwrap_or_default()
                )
            })
            .collect();
        format!(
            "{}\n{} steps in {:.1} s: {:.1} ms/step, {:.0} training tok/s{}; peak RSS {}{}{ranks}\nadapter saved in {}",
            self.metrics_table(),
            self.steps,
            self.train_seconds,
            self.step_time_ms,
            self.train_tokens_per_s,
            if self.world_size > 1 { format!(" over {} ranks", self.world_size) } else { String::new() },
            self.peak_rss_bytes.map(human_bytes).unwrap_or_else(|| "unknown".into()),
            gpu,
            self.adapter.display()
        )
    }
}

/// The JSON pointers that identify a run in the results file: a new run replaces an earlier one with the same
/// model, device, quantization and targets.
pub const RESULTS_KEY: [&str; 4] = ["/model", "/device", "/quantization", "/settings/targets"];

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

struct Data {
    train: Vec<Example>,
    eval: Vec<Example>,
    name: String,
    sha256: String,
}

/// The training and held-out examples; `seed` splits `eval_split` off the data when there is no held-out file.
fn load_data(p: &FinetuneParams, seed: u64) -> Result<Data> {
    let Some(path) = &p.data else {
        return Ok(Data {
            train: data::parse_jsonl(data::DEFAULT_TRAIN, "built-in train.jsonl")?,
            eval: data::parse_jsonl(data::DEFAULT_EVAL, "built-in eval.jsonl")?,
            name: "built-in: review sentiment (100 train / 20 held out)".to_string(),
            sha256: sha256_hex(data::DEFAULT_TRAIN.as_bytes()),
        });
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display())).about(Input::Data)?;
    let all = data::parse_jsonl(&text, &path.display().to_string()).about(Input::Data)?;
    let (train, eval) = match &p.eval_data {
        Some(e) => (all, data::read_jsonl(e).about(Input::EvalData)?),
        None => data::split(all, p.eval_split, seed).about(Input::Data)?,
    };
    Ok(Data { train, eval, name: path.display().to_string(), sha256: sha256_hex(text.as_bytes()) })
}

/// The state saved in a complete checkpoint folder, checked to belong to `model` and to hold valid settings.
fn checkpoint_state(dir: &Path, model: &str) -> Result<TrainerState> {
    let st = train::checkpoint_state(dir)?;
    if st.model != model {
        anyhow::bail!("{}: the checkpoint was trained on model {}, not {}", dir.display(), st.model, model);
    }
    if let Err(e) = st.settings.validate() {
        anyhow::bail!("{}: the checkpoint's {} {e}", dir.display(), e.setting);
    }
    Ok(st)
}

/// The given settings that a resumed run does not use because they differ from the checkpoint's, as
/// `name given (checkpoint: value)`.
fn ignored_settings(given: &TrainSettings, checkpoint: &TrainSettings) -> Vec<String> {
    let (Ok(serde_json::Value::Object(g)), Ok(serde_json::Value::Object(c))) =
        (serde_json::to_value(given), serde_json::to_value(checkpoint))
    else {
        return vec![];
    };
    g.iter()
        .filter(|(k, v)| k.as_str() != "targets" && c.get(*k).is_some_and(|cv| cv != *v))
        .map(|(k, v)| format!("{k} {v} (checkpoint: {})", c[k]))
        .collect()
}

/// Where `--merge` writes for this base, checked to be writable as what it will be (a folder or a file).
fn merge_target(out: &Path, source: &ModelSource) -> Result<PathBuf> {
    let (target, folder) = match source {
        ModelSource::HfDir(_) => (out.join("merged"), true),
        ModelSource::Gguf(_) => (out.join("merged.gguf"), false),
        ModelSource::ConfigOnly(_) => {
            anyhow::bail!("a model with random weights has no weight files to merge the adapter into")
        }
    };
    if target.exists() && target.is_dir() != folder {
        let kind = if folder { "a folder" } else { "a file" };
        anyhow::bail!("{} is in the way: the merged model there will be {kind}", target.display());
    }
    Ok(target)
}

fn tokenize_all(
    r: &Renderer,
    ex: &[Example],
    max_len: usize,
    what: &str,
    hooks: &mut dyn RunHooks,
) -> Result<Vec<Tokenized>> {
    let mut out = vec![];
    let mut cut = 0;
    for (i, e) in ex.iter().enumerate() {
        let t = r.tokenize(e, max_len).with_context(|| format!("{what} example {}", i + 1))?;
        if t.trained_tokens() == 0 {
            cut += 1;
        }
        out.push(t);
    }
    if cut > 0 {
        hooks.note(&format!(
            "note: {cut} {what} example(s) have no answer tokens left within the length limit ({max_len} tokens)"
        ));
    }
    if cut == out.len() {
        return Err(input_error(
            Input::MaxLen,
            anyhow::anyhow!("no {what} example has answer tokens within {max_len} tokens; raise the length limit"),
        ));
    }
    Ok(out)
}

/// Run the whole job; see the module documentation. Errors about one input are [`InputError`]s; a run stopped
/// through the hooks' flag ends in [`Interrupted`].
pub fn run(p: &FinetuneParams, hooks: &mut dyn RunHooks) -> Result<FinetuneRecord> {
    run_rank(p, hooks, &mut Group::single())?.context("a run of one rank returned no record")
}

/// One data-parallel rank of a run (see [`crate::dist`]): every rank loads its replica and trains on its share of
/// each step; rank 0 evaluates, writes the adapter, checkpoints and results, and returns the record (the others
/// return `None` once training is done).
pub fn run_rank(p: &FinetuneParams, hooks: &mut dyn RunHooks, group: &mut Group) -> Result<Option<FinetuneRecord>> {
    let wall = Instant::now();
    let main = group.is_main();
    // Everything that can be checked without the model, before any work: values, where the outputs go, the
    // checkpoint, the data.
    if p.max_steps == Some(0) {
        return Err(input_error(Input::MaxSteps, anyhow::anyhow!("must be at least 1")));
    }
    if p.data.is_some() && p.eval_data.is_none() && !(0.0..1.0).contains(&p.eval_split) {
        return Err(input_error(Input::EvalSplit, anyhow::anyhow!("must be in [0, 1), got {}", p.eval_split)));
    }
    let resumed = match &p.resume {
        Some(dir) => Some(checkpoint_state(dir, &p.model).about(Input::Resume)?),
        None => {
            p.settings.validate().map_err(|e| input_error(Input::Setting(e.setting), e))?;
            None
        }
    };
    if p.out.exists() && !p.out.is_dir() {
        return Err(input_error(Input::Out, anyhow::anyhow!("{}: not a folder", p.out.display())));
    }
    if main {
        files::check_writable_folder(&p.out).about(Input::Out)?;
        if let Some(results) = &p.results {
            crate::util::check_results_file(results).about(Input::Results)?;
        }
    }
    let data = load_data(p, resumed.as_ref().map_or(p.settings.seed, |st| st.settings.seed))?;
    if let Some(st) = &resumed {
        if st.data_sha256 != data.sha256 {
            return Err(input_error(
                Input::Resume,
                anyhow::anyhow!(
                    "the training data differs from the checkpoint's ({}); resume with the same data",
                    st.data
                ),
            ));
        }
    }
    if let Some(st) = &resumed {
        let ignored = ignored_settings(&p.settings, &st.settings);
        if !ignored.is_empty() {
            hooks.note(&format!("note: resuming with the checkpoint's settings; not used: {}", ignored.join(", ")));
        }
    }
    let source = crate::load::resolve(&p.model, p.load.random_weights).about(Input::Model)?;
    let merge_to = if p.merge { Some(merge_target(&p.out, &source).about(Input::Merge)?) } else { None };

    let mut loaded = hooks.load(&p.model, &p.load)?;
    if group.world() > 1 {
        group.agree("model", &crate::dist::model_fingerprint(&loaded))?;
        group.agree("training data (sha256)", &data.sha256)?;
        let given = serde_json::to_string(&(&p.settings, format!("{:?}", p.targets), p.max_steps, p.resume.is_some()))?;
        group.agree("training settings", &given)?;
        if let (Some(dir), Some(st)) = (&p.resume, &resumed) {
            // Every rank resumes from the same checkpoint (hosts without a shared disk each read their own copy).
            let adapter = std::fs::read(dir.join("adapter_model.safetensors")).unwrap_or_default();
            group.agree("checkpoint (step, adapter sha256)", &format!("{} {}", st.step, sha256_hex(&adapter)))?;
        }
        group.connect_devices(loaded.model.device())?;
    }
    let cfg = loaded.config().clone();
    let layer_names: Vec<String> = loaded.model.linears_mut().into_iter().map(|(n, _)| n).collect();
    let s = match &resumed {
        Some(st) => st.settings.clone(),
        None => TrainSettings {
            targets: p.targets.resolve(cfg.architecture, &layer_names).about(Input::Targets)?,
            ..p.settings.clone()
        },
    };
    let quantization = loaded.quantization.clone();
    let eos = crate::chat::end_of_turn_ids(&loaded);
    let tokenizer = loaded.tokenizer.as_ref().with_context(|| {
        format!("{}: finetune needs a tokenizer to turn the data into tokens, and this model has none", p.model)
    })?;
    let renderer = Renderer::new(tokenizer);
    if renderer.template.is_fallback() {
        hooks.note(&format!("note: {}", crate::chat::template::FALLBACK_DESCRIPTION));
    }
    let train = tokenize_all(&renderer, &data.train, s.max_len, "training", hooks)?;
    let eval_tok = tokenize_all(&renderer, &data.eval, s.max_len, "held-out", hooks)?;
    if main {
        std::fs::create_dir_all(&p.out)
            .with_context(|| format!("{}: cannot create", p.out.display()))
            .about(Input::Out)?;
    }
    let cleaned = if main { files::clean_leftovers(&p.out) } else { 0 };
    if cleaned > 0 {
        hooks.note(&format!(
            "removed {cleaned} unfinished temporary output(s) of an earlier run from {}",
            p.out.display()
        ));
    }
    let train_tokens: usize = train.iter().map(|t| t.ids.len()).sum();

    let lora_cfg = LoraConfig {
        r: s.rank,
        lora_alpha: s.alpha,
        target_modules: s.targets.clone(),
        lora_dropout: train::f32_as_given(s.dropout),
        base_model_name_or_path: Some(p.model.clone()),
    };
    let device = loaded.model.device().clone();
    let lora = Lora::init(&mut loaded.model, lora_cfg, s.seed)?;
    let trainable = lora.num_params();
    let total_params = cfg.parameter_count() as usize;
    let architecture = format!("{:?}", cfg.architecture).to_lowercase();
    hooks.note(&format!(
        "{}: {} {} on {} ({}), {} train / {} held-out examples ({} tokens), LoRA r={} alpha={} on {} ({} layers): {} trainable parameters ({:.3}% of {})",
        p.model,
        architecture,
        quantization,
        device_name(&device),
        dtype_name(loaded.model.dtype()),
        train.len(),
        eval_tok.len(),
        train_tokens,
        s.rank,
        s.alpha,
        s.targets.join(","),
        lora.params.len(),
        trainable,
        100.0 * trainable as f64 / total_params as f64,
        total_params
    ));

    // Rank 0 evaluates; the others take its figures (and wait for them).
    let before = match resumed.as_ref().and_then(|st| st.before.clone()) {
        Some(b) => b,
        None => {
            let mine = if main {
                hooks.note("evaluating the base model on the held-out examples…");
                Some(evaluate(&loaded.model, &renderer, &data.eval, &eval_tok, s.batch_size, &eos, p.show)?)
            } else {
                None
            };
            group.all_gather_json(&mine)?.swap_remove(0).context("rank 0 sent no evaluation")?
        }
    };
    let world = group.world();
    let per_epoch = train::steps_per_epoch(train.len(), &s, world);
    let total_steps = match p.max_steps {
        Some(m) => (per_epoch * s.epochs).min(m),
        None => per_epoch * s.epochs,
    };
    let state = match resumed {
        // A checkpoint of another world size: the same epoch and share of it done, counted in this run's steps
        // (AdamW keeps counting its own updates).
        Some(st) if st.world_size != world => {
            let old_per_epoch = train::steps_per_epoch(train.len(), &s, st.world_size);
            let map = |k| train::map_step(k, old_per_epoch, st.world_size, per_epoch, world);
            let (step, total) = (map(st.step), map(st.total_steps));
            hooks.note(&format!(
                "note: the checkpoint was written by {} rank(s), this run has {world}: step {} of {} there is step {step} of {total} here",
                st.world_size, st.step, st.total_steps
            ));
            let updates = if st.updates > 0 { st.updates } else { st.step };
            TrainerState { step, total_steps: total, world_size: world, updates, ..st }
        }
        Some(st) => st,
        None => TrainerState {
            settings: s.clone(),
            model: p.model.clone(),
            data: data.name.clone(),
            data_sha256: data.sha256.clone(),
            step: 0,
            total_steps,
            history: vec![],
            train_seconds: 0.0,
            tokens_trained: 0,
            before: Some(before.clone()),
            world_size: world,
            updates: 0,
        },
    };
    let mut trainer = Trainer::new(&mut loaded.model, lora, train, state, &p.out)?;
    trainer.pause_in_save = p.pause_in_save;
    trainer.group = Some(&*group);
    trainer.checkpointing = p.checkpointing;
    if let Some(dir) = &p.resume {
        trainer.restore(dir).about(Input::Resume)?;
        hooks.note(&format!("resuming at step {} of {}", trainer.state.step, trainer.state.total_steps));
    }
    let total = trainer.state.total_steps;
    let mut peak_gpu: Option<u64> = None;
    let outcome = {
        let interrupt = hooks.training_started(trainer.state.step, total)?;
        let mut train_hooks = train::Hooks {
            interrupt,
            on_step: Box::new(|r, total| hooks.step(r, total)),
            on_memory: Box::new(|| {
                if let Some(used) = crate::util::gpu_memory_used_bytes(&device) {
                    peak_gpu = Some(peak_gpu.unwrap_or(0).max(used));
                }
            }),
            inject_nan_at_step: p.inject_nan_at_step,
        };
        trainer.run(&mut train_hooks)
    };
    hooks.training_finished();
    if let Outcome::Interrupted(checkpoint) = outcome? {
        return Err(Interrupted { step: trainer.state.step, total, checkpoint }.into());
    }
    let ranks = if world > 1 {
        let t = &trainer.totals;
        let mine = RankRecord {
            rank: group.rank(),
            device: device_name(&device),
            loss: t.nll / t.targets.max(1) as f64,
            tokens: t.tokens,
            train_seconds: t.seconds,
            train_tokens_per_s: t.tokens as f64 / t.seconds.max(1e-9),
            peak_gpu_allocated_bytes: crate::util::gpu_peak_allocated_bytes(&device),
            peak_rss_bytes: crate::util::peak_rss_bytes(),
        };
        group.all_gather_json(&mine)?
    } else {
        vec![]
    };
    if !main {
        return Ok(None);
    }
    let ranks_devices = ranks.iter().map(|r| r.device.as_str()).collect::<Vec<_>>().join("+");
    let state = trainer.state.clone();
    let lora = trainer.lora;
    drop(trainer.optimizer);
    let model = trainer.model;
    lora.save_for(&p.out, &cfg)?;

    model.set_ops(crate::model::Ops::Fused);
    lora.attach_frozen(model, model.dtype())?;
    hooks.note("evaluating the fine-tuned model on the held-out examples…");
    let after = evaluate(model, &renderer, &data.eval, &eval_tok, s.batch_size, &eos, p.show)?;

    let merged = match (&merge_to, &source) {
        (Some(to), ModelSource::HfDir(dir)) => Some(merge::merge_hf_folder(dir, &lora, to, p.pause_in_save)?),
        (Some(to), ModelSource::Gguf(file)) => {
            Some(merge::merge_gguf(file, cfg.architecture, &lora, to, p.pause_in_save)?)
        }
        _ => None,
    };
    if let Some(path) = &merged {
        hooks.note(&format!("merged model written to {}", path.display()));
    }

    // Timing over steady-state steps: the first step includes one-time setup (kernels, allocations).
    let steady: Vec<_> = state.history.iter().skip(if state.history.len() > 2 { 1 } else { 0 }).collect();
    let step_ms = 1e3 * steady.iter().map(|r| r.seconds).sum::<f64>() / steady.len().max(1) as f64;
    let tok_s =
        steady.iter().map(|r| r.tokens).sum::<usize>() as f64 / steady.iter().map(|r| r.seconds).sum::<f64>().max(1e-9);
    let shown = data
        .eval
        .iter()
        .take(p.show)
        .map(|ex| ShownExample {
            prompt: ex.prompt_messages().last().map(|m| m.content.clone()).unwrap_or_default(),
            expected: ex.answer().to_string(),
        })
        .collect();
    let record = FinetuneRecord {
        schema_version: 1,
        timestamp: crate::util::now(),
        model: p.model.clone(),
        architecture,
        quantization,
        device: match world {
            1 => device_name(&device),
            _ => ranks_devices,
        },
        dtype: dtype_name(model.dtype()).to_string(),
        data: state.data,
        train_examples: data.train.len(),
        eval_examples: data.eval.len(),
        settings: state.settings,
        checkpointing: p.checkpointing,
        steps: state.step,
        trainable_parameters: trainable,
        total_parameters: total_params,
        trainable_share: trainable as f64 / total_params as f64,
        step_time_ms: step_ms,
        train_tokens_per_s: tok_s,
        train_seconds: state.train_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::util::peak_rss_bytes(),
        peak_gpu_memory_bytes: peak_gpu,
        peak_gpu_allocated_bytes: crate::util::gpu_peak_allocated_bytes(&device),
        loss_curve: state.history,
        world_size: world,
        ranks,
        before,
        after,
        adapter: p.out.clone(),
        merged,
        shown,
    };
    if let Some(path) = &p.results {
        crate::util::save_run(path, serde_json::to_value(&record)?, &RESULTS_KEY).about(Input::Results)?;
    }
    // The run is complete: its checkpoint (and the one it resumed from, wherever that was) is spent.
    for dir in std::iter::once(p.out.join("checkpoint")).chain(p.resume.clone()) {
        if dir.join(train::CHECKPOINT_COMPLETE).is_file() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove the spent checkpoint {}", dir.display()))?;
        }
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_against_the_model() {
        let layers: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .flat_map(|n| (0..2).map(move |l| format!("model.layers.{l}.self_attn.{n}")))
            .collect();
        let arch = Architecture::Llama;
        assert_eq!(Targets::Default.resolve(arch, &layers).unwrap(), ["q_proj", "v_proj"]);
        assert_eq!(Targets::from_names(&["all".into()]), Targets::All);
        assert_eq!(Targets::All.resolve(arch, &layers).unwrap(), ["k_proj", "o_proj", "q_proj", "v_proj"]);
        let named = Targets::from_names(&[" k_proj".into(), "".into()]);
        assert_eq!(named.resolve(arch, &layers).unwrap(), ["k_proj"]);
        let e = Targets::from_names(&["w_proj".into()]).resolve(arch, &layers).unwrap_err().to_string();
        assert!(e.contains("w_proj") && e.contains("q_proj"), "{e}");
    }

    #[test]
    fn input_errors_read_as_the_error_and_keep_their_input() {
        let e: anyhow::Error = Err::<(), _>(anyhow::anyhow!("inner")).context("outer").about(Input::Data).unwrap_err();
        assert_eq!(format!("{e:#}"), "outer: inner");
        assert_eq!(e.downcast_ref::<InputError>().map(|i| i.input), Some(Input::Data));
    }
}

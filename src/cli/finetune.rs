//! `billion finetune`: LoRA training on instruction/chat JSONL, before/after evaluation, PEFT adapter out,
//! optional merged model, results/finetune_results.json. The run itself is `finetune::pipeline`.

use super::{DistArgs, LoadArgs};
use crate::dist::{Group, Launch};
use crate::finetune::pipeline::{self, FinetuneParams, Input, InputError, Interrupted, RunHooks, Targets};
use crate::finetune::train::{StepRecord, TrainSettings};
use crate::load::{LoadOptions, LoadedModel};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: LoadArgs,
    /// Training data, JSONL: {"instruction", "input"?, "output"} or {"messages": [...]} per line
    /// (default: the built-in 100-example review-sentiment task, one-word answers)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data for evaluation (default: --eval-split of --data, or the built-in task's 20 held-out examples)
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Share of --data held out for evaluation when --eval-data is not given
    #[arg(long, default_value_t = 0.1)]
    pub eval_split: f64,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans the shorter of this and the epochs)
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate (linear decay to zero after warmup)
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// LoRA rank r
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r)
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Linear layers to adapt: comma-separated names (q_proj,v_proj) or `all`
    /// (default: q_proj,v_proj; query_key_value for GPT-NeoX)
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Dropout on the adapters' input while training
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest example in tokens (longer ones are cut)
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Share of the steps spent warming the learning rate up
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Learning-rate schedule after warmup: linear (decay to zero) or constant
    #[arg(long, default_value = "linear", value_parser = ["linear", "constant"])]
    pub lr_schedule: String,
    /// AdamW weight decay
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Activation checkpointing: keep each layer's input only and run the layer again in the backward pass
    /// (less memory for long sequences and large batches, about a third more time per step)
    #[arg(long)]
    pub checkpointing: bool,
    /// Where the adapter goes (adapter_config.json + adapter_model.safetensors; checkpoint/ while training)
    #[arg(long, default_value = "lora-adapter")]
    pub out: PathBuf,
    /// Also write the base model with the adapter merged in: OUT/merged/ (folder base) or OUT/merged.gguf
    #[arg(long)]
    pub merge: bool,
    /// Continue from a checkpoint folder (OUT/checkpoint, saved on Ctrl-C)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Held-out examples whose generations are shown before/after
    #[arg(long, default_value_t = 3)]
    pub show: usize,
    /// Results file (merged in place, written atomically)
    #[arg(long, default_value = "results/finetune_results.json")]
    pub results: PathBuf,
    /// Print the results as JSON on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dist: DistArgs,
}

impl FinetuneArgs {
    fn params(&self) -> FinetuneParams {
        FinetuneParams {
            model: self.model.model.clone(),
            load: self.model.options(),
            data: self.data.clone(),
            eval_data: self.eval_data.clone(),
            eval_split: self.eval_split,
            settings: TrainSettings {
                epochs: self.epochs,
                lr: self.lr,
                rank: self.rank,
                alpha: self.alpha,
                targets: vec![],
                dropout: self.dropout,
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                max_len: self.max_len,
                seed: self.seed,
                warmup_ratio: self.warmup_ratio,
                lr_schedule: self.lr_schedule.clone(),
                weight_decay: self.weight_decay,
                max_grad_norm: self.max_grad_norm,
            },
            targets: self.targets.as_deref().map(Targets::from_names).unwrap_or_default(),
            max_steps: self.max_steps,
            checkpointing: self.checkpointing,
            out: self.out.clone(),
            merge: self.merge,
            resume: self.resume.clone(),
            show: self.show,
            results: Some(self.results.clone()),
            inject_nan_at_step: std::env::var("BILLION_FINETUNE_NAN_AT_STEP").ok().and_then(|v| v.parse().ok()),
            pause_in_save: std::env::var("BILLION_FINETUNE_PAUSE_IN_SAVE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
        }
    }
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    if a.model.adapter.is_some() {
        bail!("--adapter: finetune trains a new adapter; to continue a run use --resume OUT/checkpoint");
    }
    if a.merge && a.model.random_weights {
        bail!("--merge needs a model with weight files; --random-weights models have none to merge into");
    }
    let launch = a.dist.launch(a.model.device.device)?;
    let params = a.params();
    // --batch-size is per rank: a step of N ranks trains N batches, and each rank's gradients are summed.
    let work = |group: &mut Group, device| {
        let p = FinetuneParams { load: LoadOptions { device, ..params.clone().load }, ..params.clone() };
        // Rank 0 shows progress; a rank in its own process takes Ctrl-C (threads share rank 0's).
        let ctrl_c = group.is_main() || matches!(launch, Launch::Process { .. });
        let mut terminal = Terminal::new(!a.json && group.is_main() && std::io::stderr().is_terminal(), ctrl_c);
        terminal.quiet = !group.is_main();
        pipeline::run_rank(&p, &mut terminal, group)
    };
    let Some(record) = crate::dist::run(&launch, &work).map_err(flagged)? else {
        eprintln!("this rank's share of the training is done; rank 0 writes the adapter and the results");
        return Ok(());
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::to_value(&record)?)?);
    } else {
        println!("{}", record.summary());
    }
    Ok(())
}

/// The flag behind an input error; how to continue an interrupted run.
fn flagged(e: anyhow::Error) -> anyhow::Error {
    let e = match e.downcast::<InputError>() {
        Ok(InputError { input, error }) => return error.context(flag(input)),
        Err(e) => e,
    };
    match e.downcast_ref::<Interrupted>() {
        Some(i) => {
            let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
            anyhow::Error::new(super::StoppedByUser(format!(
                "{i}; continue with: {}",
                resume_command(&argv, &i.checkpoint)
            )))
        }
        None => e,
    }
}

fn flag(input: Input) -> String {
    let name = match input {
        Input::Model => "model",
        Input::Data => "data",
        Input::EvalData => "eval-data",
        Input::EvalSplit => "eval-split",
        Input::Targets => "targets",
        Input::MaxSteps => "max-steps",
        Input::MaxLen => "max-len",
        Input::Out => "out",
        Input::Merge => "merge",
        Input::Resume => "resume",
        Input::Results => "results",
        // The settings' field names are their flags' names.
        Input::Setting(field) => return format!("--{}", field.replace('_', "-")),
    };
    format!("--{name}")
}

/// The command line that continues this run from `checkpoint`: the run's own arguments (program, model,
/// data, outputs, settings, as given), any earlier `--resume` replaced, shell-quoted.
fn resume_command(argv: &[String], checkpoint: &std::path::Path) -> String {
    let mut words: Vec<String> = vec![];
    let mut args = argv.iter();
    while let Some(a) = args.next() {
        if a == "--resume" {
            args.next();
        } else if !a.starts_with("--resume=") {
            words.push(a.clone());
        }
    }
    words.push("--resume".into());
    words.push(checkpoint.to_string_lossy().into_owned());
    words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
}

/// `word` as one POSIX shell word: as is when it holds only characters the shell leaves alone, else in
/// single quotes.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Progress on stderr: a bar on a terminal (not with --json), else a line every tenth of the run; Ctrl-C
/// while training stops with a checkpoint.
struct Terminal {
    show_bar: bool,
    bar: Option<ProgressBar>,
    print_every: usize,
    /// Take Ctrl-C (one handler per process).
    ctrl_c: bool,
    /// Print nothing (a rank other than 0).
    quiet: bool,
}

impl Terminal {
    fn new(show_bar: bool, ctrl_c: bool) -> Self {
        Self { show_bar, bar: None, print_every: 1, ctrl_c, quiet: false }
    }
}

impl RunHooks for Terminal {
    fn load(&mut self, model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
        super::args::load_flagged(model, opts)
    }

    fn note(&mut self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    fn training_started(&mut self, step: usize, total: usize) -> Result<Arc<AtomicBool>> {
        let interrupt = Arc::new(AtomicBool::new(false));
        let flag = interrupt.clone();
        if self.ctrl_c {
            ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
                .context("cannot install the Ctrl-C handler")?;
        }
        if self.show_bar {
            let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_position(step as u64);
            self.bar = Some(bar);
        }
        self.print_every = (total / 10).max(1);
        Ok(interrupt)
    }

    fn step(&mut self, r: &StepRecord, total: usize) {
        let msg =
            format!("loss {:.4}  {:.0} tok/s  {:.0} ms/step", r.loss, r.tokens as f64 / r.seconds, r.seconds * 1e3);
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(msg);
            }
            None if self.quiet => {}
            None if r.step.is_multiple_of(self.print_every) || r.step == total => {
                eprintln!("step {}/{}  epoch {:.2}  {msg}  lr {:.2e}", r.step, total, r.epoch, r.lr);
            }
            None => {}
        }
    }

    fn training_finished(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_command_keeps_the_run_and_quotes_it() {
        let argv: Vec<String> =
            ["/bin/billion", "finetune", "--model", "m", "--out", "my run", "--resume", "old", "--lr", "1e-3"]
                .map(String::from)
                .to_vec();
        assert_eq!(
            resume_command(&argv, std::path::Path::new("my run/checkpoint")),
            "/bin/billion finetune --model m --out 'my run' --lr 1e-3 --resume 'my run/checkpoint'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn settings_name_their_flags() {
        assert_eq!(flag(Input::Setting("max_grad_norm")), "--max-grad-norm");
        assert_eq!(flag(Input::Results), "--results");
    }
}

//! `billion finetune`: LoRA training on instruction/chat JSONL, before/after evaluation, PEFT adapter out,
//! optional merged model, results/finetune_results.json.

use super::ModelArgs;
use crate::finetune::data::{self, Example, Renderer, Tokenized};
use crate::finetune::lora::{Lora, LoraConfig};
use crate::finetune::merge;
use crate::finetune::train::{evaluate, EvalMetrics, Hooks, Outcome, TrainSettings, Trainer, TrainerState};
use crate::model::config::Architecture;
use crate::model::device::{device_name, dtype_name};
use crate::model::loader::ModelSource;
use crate::util::human_bytes;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    #[arg(long, default_value = "linear")]
    pub lr_schedule: String,
    /// AdamW weight decay
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn settings(a: &FinetuneArgs, targets: Vec<String>) -> TrainSettings {
    TrainSettings {
        epochs: a.epochs,
        lr: a.lr,
        rank: a.rank,
        alpha: a.alpha,
        targets,
        dropout: a.dropout,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        seed: a.seed,
        warmup_ratio: a.warmup_ratio,
        lr_schedule: a.lr_schedule.clone(),
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
    }
}

/// `q_proj,v_proj` / `all` → the layer names the adapter goes on, checked against the model.
fn resolve_targets(spec: Option<&[String]>, arch: Architecture, layer_names: &[String]) -> Result<Vec<String>> {
    let mut short: Vec<String> = layer_names.iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect();
    short.sort();
    short.dedup();
    let wanted: Vec<String> = match spec {
        None if arch == Architecture::GptNeoX => vec!["query_key_value".into()],
        None => vec!["q_proj".into(), "v_proj".into()],
        Some(s) if s.iter().any(|t| t == "all" || t == "all-linear") => return Ok(short),
        Some(s) => s.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
    };
    for t in &wanted {
        if !short.contains(t) {
            bail!("--targets: this model has no linear layer named {t} (it has: {}, or `all`)", short.join(", "));
        }
    }
    Ok(wanted)
}

struct Data {
    train: Vec<Example>,
    eval: Vec<Example>,
    name: String,
    sha256: String,
}

fn load_data(a: &FinetuneArgs) -> Result<Data> {
    let (train, eval, name, bytes) = match &a.data {
        None => {
            let train = data::parse_jsonl(data::DEFAULT_TRAIN, "built-in train.jsonl")?;
            let eval = data::parse_jsonl(data::DEFAULT_EVAL, "built-in eval.jsonl")?;
            (
                train,
                eval,
                "built-in: review sentiment (100 train / 20 held out)".to_string(),
                data::DEFAULT_TRAIN.into(),
            )
        }
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("--data {}: cannot read", p.display()))?;
            let all = data::read_jsonl(p)?;
            let (train, eval) = match &a.eval_data {
                Some(e) => (all, data::read_jsonl(e)?),
                None => {
                    if !(0.0..1.0).contains(&a.eval_split) {
                        bail!("--eval-split must be in [0, 1), got {}", a.eval_split);
                    }
                    data::split(all, a.eval_split, a.seed)?
                }
            };
            (train, eval, p.display().to_string(), bytes)
        }
    };
    Ok(Data { train, eval, name, sha256: sha256_hex(&bytes) })
}

fn tokenize_all(r: &Renderer, ex: &[Example], max_len: usize, what: &str) -> Result<Vec<Tokenized>> {
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
        eprintln!("note: {cut} {what} example(s) have no answer tokens left within --max-len {max_len}");
    }
    if cut == out.len() {
        bail!("no {what} example has answer tokens within --max-len {max_len}; raise --max-len");
    }
    Ok(out)
}

fn metrics_table(before: &EvalMetrics, after: &EvalMetrics, eval: &[Example]) -> String {
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
    s.push_str(&format!("| exact match | {:.1}% | {:.1}% |\n", 100.0 * before.exact_match, 100.0 * after.exact_match));
    let clip = |t: &str| {
        let one = t.replace('\n', "⏎");
        if one.chars().count() > 60 {
            format!("{}…", one.chars().take(60).collect::<String>())
        } else {
            one
        }
    };
    for (i, ex) in eval.iter().enumerate().take(before.generations.len().min(after.generations.len())) {
        let prompt = ex.prompt_messages().last().map(|m| m.content.as_str()).unwrap_or("");
        s.push_str(&format!("\nexample {}: {}\n", i + 1, clip(prompt)));
        s.push_str(&format!("  expected: {}\n", clip(ex.answer())));
        s.push_str(&format!("  before:   {}\n", clip(&before.generations[i])));
        s.push_str(&format!("  after:    {}\n", clip(&after.generations[i])));
    }
    s
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    if a.model.adapter.is_some() {
        bail!("--adapter: finetune trains a new adapter; to continue a run use --resume OUT/checkpoint");
    }
    let wall = Instant::now();
    let resumed: Option<TrainerState> = match &a.resume {
        Some(dir) => {
            let p = dir.join("trainer_state.json");
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!("--resume {}: no trainer_state.json (expected OUT/checkpoint)", dir.display())
            })?;
            let st: TrainerState =
                serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", p.display()))?;
            if st.model != a.model.model {
                bail!(
                    "--resume {}: the checkpoint was trained on --model {}, not {}",
                    dir.display(),
                    st.model,
                    a.model.model
                );
            }
            Some(st)
        }
        None => None,
    };
    if resumed.is_none() {
        settings(&a, vec![]).validate()?; // flags first, before any loading
    }
    let source = crate::model::loader::resolve(&a.model.model, a.model.random_weights)?;
    if a.merge && matches!(source, ModelSource::ConfigOnly(_)) {
        bail!("--merge needs a model with weight files; --random-weights models have none to merge into");
    }
    let mut loaded = crate::model::load(&a.model.model, &a.model.load_options()?)?;
    let cfg = loaded.config().clone();
    let data = load_data(&a)?;
    if let Some(st) = &resumed {
        if st.data_sha256 != data.sha256 {
            bail!(
                "--resume: the training data differs from the checkpoint's ({}); resume with the same --data",
                st.data
            );
        }
    }
    let layer_names: Vec<String> = loaded.model.linears_mut().into_iter().map(|(n, _)| n).collect();
    let s = match &resumed {
        Some(st) => st.settings.clone(),
        None => {
            let targets = resolve_targets(a.targets.as_deref(), cfg.architecture, &layer_names)?;
            settings(&a, targets)
        }
    };
    s.validate()?;
    let quantization = loaded.quantization.clone();
    let eos = crate::chat::end_of_turn_ids(&loaded);
    let tokenizer = loaded.tokenizer.as_ref().with_context(|| {
        format!("{}: finetune needs a tokenizer to turn the data into tokens, and this model has none", a.model.model)
    })?;
    let renderer = Renderer::new(tokenizer);
    if renderer.template.is_fallback() {
        eprintln!("note: {}", crate::chat::template::FALLBACK_DESCRIPTION);
    }
    let train = tokenize_all(&renderer, &data.train, s.max_len, "training")?;
    let eval_tok = tokenize_all(&renderer, &data.eval, s.max_len, "held-out")?;
    let train_tokens: usize = train.iter().map(|t| t.ids.len()).sum();

    let lora_cfg = LoraConfig {
        r: s.rank,
        lora_alpha: s.alpha,
        target_modules: s.targets.clone(),
        lora_dropout: s.dropout as f64,
        base_model_name_or_path: Some(a.model.model.clone()),
    };
    let device = loaded.model.device().clone();
    let lora = Lora::init(&mut loaded.model, lora_cfg, s.seed)?;
    let trainable = lora.num_params();
    let total_params = cfg.parameter_count() as usize;
    eprintln!(
        "{}: {} {} on {} ({}), {} train / {} held-out examples ({} tokens), LoRA r={} alpha={} on {} ({} layers): {} trainable parameters ({:.3}% of {})",
        a.model.model,
        format!("{:?}", cfg.architecture).to_lowercase(),
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
    );

    let before = match resumed.as_ref().and_then(|st| st.before.clone()) {
        Some(b) => b,
        None => {
            eprintln!("evaluating the base model on the held-out examples…");
            evaluate(&loaded.model, &renderer, &data.eval, &eval_tok, s.batch_size, &eos, a.show)?
        }
    };
    let per_epoch = crate::finetune::train::steps_per_epoch(train.len(), &s);
    let mut total_steps = per_epoch * s.epochs;
    if let Some(m) = a.max_steps {
        if m == 0 {
            bail!("--max-steps must be at least 1");
        }
        total_steps = total_steps.min(m);
    }
    let state = match resumed {
        Some(st) => st,
        None => TrainerState {
            settings: s.clone(),
            model: a.model.model.clone(),
            data: data.name.clone(),
            data_sha256: data.sha256.clone(),
            step: 0,
            total_steps,
            history: vec![],
            train_seconds: 0.0,
            tokens_trained: 0,
            before: Some(before.clone()),
        },
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}: cannot create", a.out.display()))?;

    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("cannot install the Ctrl-C handler")?;
    }
    let mut trainer = Trainer::new(&mut loaded.model, lora, train, state, &a.out)?;
    if let Some(dir) = &a.resume {
        trainer.restore(dir)?;
        eprintln!("resuming at step {} of {}", trainer.state.step, trainer.state.total_steps);
    }
    let total = trainer.state.total_steps;
    let bar = ProgressBar::new(total as u64);
    let tty = std::io::stderr().is_terminal();
    if tty {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_position(trainer.state.step as u64);
    let mut peak_gpu: Option<u64> = None;
    let print_every = (total / 10).max(1);
    let outcome = {
        let device = device.clone();
        let bar = bar.clone();
        let mut hooks = Hooks {
            interrupt: interrupt.clone(),
            on_step: Box::new(move |r, total| {
                let msg = format!(
                    "loss {:.4}  {:.0} tok/s  {:.0} ms/step",
                    r.loss,
                    r.tokens as f64 / r.seconds,
                    r.seconds * 1e3
                );
                bar.set_position(r.step as u64);
                bar.set_message(msg.clone());
                if !tty && (r.step % print_every == 0 || r.step == total) {
                    eprintln!("step {}/{}  epoch {:.2}  {msg}  lr {:.2e}", r.step, total, r.epoch, r.lr);
                }
            }),
            on_memory: Box::new(|| {
                if let Some(used) = crate::util::gpu_memory_used_bytes(&device) {
                    peak_gpu = Some(peak_gpu.unwrap_or(0).max(used));
                }
            }),
            inject_nan_at_step: std::env::var("BILLION_FINETUNE_NAN_AT_STEP").ok().and_then(|v| v.parse().ok()),
        };
        trainer.run(&mut hooks)
    };
    bar.finish_and_clear();
    let outcome = outcome?;
    if let Outcome::Interrupted(dir) = outcome {
        bail!(
            "interrupted at step {} of {}; checkpoint saved in {}; continue with: billion finetune --model {} --resume {}",
            trainer.state.step,
            total,
            dir.display(),
            a.model.model,
            dir.display()
        );
    }
    let state = trainer.state.clone();
    let lora = trainer.lora;
    drop(trainer.optimizer);
    let model = trainer.model;
    lora.save_for(&a.out, &cfg)?;
    let ckpt = a.out.join("checkpoint");
    if ckpt.exists() {
        let _ = std::fs::remove_dir_all(&ckpt);
    }

    model.set_ops(crate::model::Ops::Fused);
    lora.attach_frozen(model, model.dtype())?;
    eprintln!("evaluating the fine-tuned model on the held-out examples…");
    let after = evaluate(model, &renderer, &data.eval, &eval_tok, s.batch_size, &eos, a.show)?;

    let merged = if a.merge {
        let p = match &source {
            ModelSource::HfDir(dir) => merge::merge_hf_folder(dir, &lora, &a.out.join("merged"))?,
            ModelSource::Gguf(file) => merge::merge_gguf(file, cfg.architecture, &lora, &a.out.join("merged.gguf"))?,
            ModelSource::ConfigOnly(_) => unreachable!("checked before training"),
        };
        eprintln!("merged model written to {}", p.display());
        Some(p)
    } else {
        None
    };

    // Timing over steady-state steps: the first step includes one-time setup (kernels, allocations).
    let steady: Vec<_> = state.history.iter().skip(if state.history.len() > 2 { 1 } else { 0 }).collect();
    let step_ms = 1e3 * steady.iter().map(|r| r.seconds).sum::<f64>() / steady.len().max(1) as f64;
    let tok_s =
        steady.iter().map(|r| r.tokens).sum::<usize>() as f64 / steady.iter().map(|r| r.seconds).sum::<f64>().max(1e-9);
    let record = serde_json::json!({
        "schema_version": 1,
        "timestamp": crate::bench::report::now(),
        "model": a.model.model,
        "architecture": format!("{:?}", cfg.architecture).to_lowercase(),
        "quantization": quantization,
        "device": device_name(&device),
        "dtype": dtype_name(model.dtype()),
        "data": state.data,
        "train_examples": data.train.len(),
        "eval_examples": data.eval.len(),
        "settings": state.settings,
        "steps": state.step,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "trainable_share": trainable as f64 / total_params as f64,
        "step_time_ms": step_ms,
        "train_tokens_per_s": tok_s,
        "train_seconds": state.train_seconds,
        "wall_seconds": wall.elapsed().as_secs_f64(),
        "peak_rss_bytes": crate::util::peak_rss_bytes(),
        "peak_gpu_memory_bytes": peak_gpu,
        "peak_gpu_allocated_bytes": crate::util::gpu_peak_allocated_bytes(&device),
        "loss_curve": state.history,
        "before": before,
        "after": after,
        "adapter": a.out,
        "merged": merged,
    });
    write_results(&a.results, &record)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!("{}", metrics_table(&before, &after, &data.eval));
        println!(
            "{} steps in {:.1} s: {:.1} ms/step, {:.0} training tok/s; peak RSS {}{}",
            state.step,
            state.train_seconds,
            step_ms,
            tok_s,
            crate::util::peak_rss_bytes().map(human_bytes).unwrap_or_else(|| "unknown".into()),
            match (crate::util::gpu_peak_allocated_bytes(&device), peak_gpu) {
                (Some(a), Some(c)) =>
                    format!(", peak GPU memory allocated {} (card in use {})", human_bytes(a), human_bytes(c)),
                (None, Some(c)) => format!(", GPU memory in use {}", human_bytes(c)),
                _ => String::new(),
            }
        );
        println!("adapter saved in {}", a.out.display());
    }
    Ok(())
}

/// Keep one record per model, device, quantization and targets; replace it when run again.
fn write_results(path: &Path, record: &serde_json::Value) -> Result<()> {
    crate::util::save_run(path, record.clone(), &["/model", "/device", "/quantization", "/settings/targets"])
}

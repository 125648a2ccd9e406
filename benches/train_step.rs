//! LoRA training step time and training tokens/s on random token batches (no tokenizer or data needed), the
//! same loop `billion finetune` runs: differentiable forward, loss over every position, backward, AdamW.
//!
//!   cargo bench --bench train_step -- --model CONFIG.json --random-weights [--batch 4] [--len 256]
//!       [--rank 8] [--targets q_proj,v_proj|all] [--dropout 0.05] [--steps 10] [--quantize q8_0]
//!       [--device cuda | --devices cuda:0,cuda:1] [--dtype bf16] [--checkpointing]
//!
//! Prints the mean step time over `--steps` after one warm-up step, tokens/s, and peak memory. With `--devices`,
//! one data-parallel rank per GPU (each its own batch, gradients summed with NCCL when built with `nccl`): the
//! step time and the tokens/s of all ranks together.

use anyhow::{bail, Context, Result};
use billion::dist::{DeviceList, Group, Launch};
use billion::finetune::data::Tokenized;
use billion::finetune::train::{Hooks, TrainSettings, Trainer, TrainerState};
use billion::load::device::{device_name, dtype_name};
use billion::load::{load, LoadOptions};
use billion::model::adapter::{Lora, LoraConfig};
use billion::model::quant::Quantize;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() -> Result<()> {
    billion::ops::cpu::pool::settle_thread_count();
    let (mut model, mut opts) = (None, LoadOptions::default());
    let (mut batch, mut len, mut rank, mut steps, mut dropout) = (4usize, 256usize, 8usize, 10usize, 0.05f32);
    let mut checkpointing = false;
    let mut targets = "q_proj,v_proj".to_string();
    let mut devices: Option<DeviceList> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" | "-m" => model = Some(value()?),
            "--batch" => batch = value()?.parse().context("--batch")?,
            "--len" => len = value()?.parse().context("--len")?,
            "--rank" => rank = value()?.parse().context("--rank")?,
            "--steps" => steps = value()?.parse().context("--steps")?,
            "--dropout" => dropout = value()?.parse().context("--dropout")?,
            "--targets" => targets = value()?,
            "--quantize" => opts.quantize = Quantize::parse(&value()?)?,
            "--device" => opts.device = Some(value()?.parse().map_err(anyhow::Error::msg)?),
            "--dtype" => opts.dtype = Some(billion::load::parse_dtype(&value()?).map_err(anyhow::Error::msg)?),
            "--devices" => devices = Some(value()?.parse().map_err(anyhow::Error::msg)?),
            "--random-weights" => opts.random_weights = true,
            "--checkpointing" => checkpointing = true,
            "--bench" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    let Some(model) = model else { bail!("usage: cargo bench --bench train_step -- --model M [--random-weights]") };
    let launch = Launch::resolve(devices.as_ref(), opts.device, std::time::Duration::from_secs(600))?;
    let world = launch.world();
    let work = |group: &mut Group, device| -> Result<()> {
        let opts = LoadOptions { device, ..opts.clone() };
        let run = Run { model: &model, batch, len, rank, steps, dropout, targets: &targets, checkpointing };
        train_on(&run, &opts, group, world)
    };
    billion::dist::run(&launch, &work)
}

struct Run<'a> {
    model: &'a str,
    batch: usize,
    len: usize,
    rank: usize,
    steps: usize,
    dropout: f32,
    targets: &'a str,
    checkpointing: bool,
}

fn train_on(run: &Run, opts: &LoadOptions, group: &mut Group, world: usize) -> Result<()> {
    let Run { model, batch, len, rank, steps, dropout, targets, checkpointing } = *run;
    let mut loaded = load(model, opts)?;
    group.connect_devices(loaded.model.device())?;
    let vocab = loaded.config().vocab_size as u32;
    let target_modules: Vec<String> =
        if targets == "all" { vec!["all-linear".into()] } else { targets.split(',').map(String::from).collect() };
    let cfg = LoraConfig {
        r: rank,
        lora_alpha: 2.0 * rank as f64,
        target_modules,
        lora_dropout: dropout as f64,
        base_model_name_or_path: None,
    };
    let lora = Lora::init(&mut loaded.model, cfg, 1)?;
    let trainable = lora.num_params();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Every rank draws the same examples and takes its own batches of each step.
    let examples: Vec<Tokenized> = (0..batch * world * (steps + 1))
        .map(|_| {
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            let labels = ids.iter().map(|&i| i as i64).collect();
            Tokenized { ids, labels }
        })
        .collect();
    let settings = TrainSettings {
        epochs: 1,
        lr: 1e-4,
        rank,
        alpha: 2.0 * rank as f64,
        targets: vec![targets.to_string()],
        dropout,
        batch_size: batch,
        grad_accum: 1,
        max_len: len,
        seed: 1,
        warmup_ratio: 0.0,
        lr_schedule: "constant".into(),
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let state = TrainerState {
        settings,
        model: model.to_string(),
        data: "random tokens".into(),
        data_sha256: String::new(),
        step: 0,
        total_steps: steps + 1,
        history: vec![],
        train_seconds: 0.0,
        tokens_trained: 0,
        before: None,
        world_size: world,
        updates: 0,
    };
    let device = loaded.model.device().clone();
    let dtype = loaded.model.dtype();
    let out = tempfile::tempdir()?;
    let mut trainer = Trainer::new(&mut loaded.model, lora, examples, state, out.path())?;
    trainer.group = Some(&*group);
    trainer.checkpointing = checkpointing;
    let mut hooks = Hooks {
        interrupt: Arc::new(AtomicBool::new(false)),
        on_step: Box::new(|_, _| {}),
        on_memory: Box::new(|| {}),
        inject_nan_at_step: None,
    };
    trainer.run(&mut hooks)?;
    let timed = &trainer.state.history[1..];
    let secs: Vec<f64> = timed.iter().map(|r| r.seconds).collect();
    let mean = secs.iter().sum::<f64>() / secs.len() as f64;
    let sd = (secs.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / secs.len().max(2).saturating_sub(1) as f64).sqrt();
    // Each rank prints its own line; with several ranks a step trains `world` batches.
    println!(
        "{model} on {}{} ({}), batch {batch} × {len}{}, r {rank}, targets {targets}, dropout {dropout}{}: {} trainable; \
         step {:.1} ± {:.1} ms, {:.0} training tok/s; peak RSS {}{}",
        device_name(&device),
        if world > 1 { format!(" (rank {} of {world})", group.rank()) } else { String::new() },
        dtype_name(dtype),
        if world > 1 { format!(" per rank, {} ranks", world) } else { String::new() },
        if checkpointing { ", checkpointing" } else { "" },
        trainable,
        mean * 1e3,
        sd * 1e3,
        (batch * len * world) as f64 / mean,
        billion::util::peak_rss_bytes().map(billion::util::human_bytes).unwrap_or_default(),
        billion::util::gpu_peak_allocated_bytes(&device)
            .map(|b| format!(", peak GPU allocated {}", billion::util::human_bytes(b)))
            .unwrap_or_default()
    );
    Ok(())
}

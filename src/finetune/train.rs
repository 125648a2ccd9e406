//! The LoRA training loop: batches of response-labelled examples, the differentiable forward, the causal-LM
//! loss, gradient accumulation and clipping, AdamW with a linear schedule; evaluation before and after;
//! checkpoints on Ctrl-C (resumable), and a stop with the last good adapter kept when the loss turns NaN.

use super::data::{Example, Renderer, Tokenized, IGNORE};
use super::files::publish;
use super::loss::labelled_rows;
use super::optim::{clip_scale, grad_norm, AdamW, AdamWParams};
use crate::dist::Group;
use crate::generation::batch::{generate_batch, BatchParams, BatchRequest};
use crate::generation::sampling::SamplingParams;
use crate::model::adapter::Lora;
use crate::model::{Gradients, Model, Ops};
use crate::util::{save_safetensors_atomic, temp_path_beside, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainSettings {
    pub epochs: usize,
    pub lr: f64,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Written to JSON as given (0.05), not as its f32's exact value.
    #[serde(serialize_with = "serialize_as_given")]
    pub dropout: f32,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub seed: u64,
    pub warmup_ratio: f64,
    /// "linear" (decay to zero after warmup) or "constant" (after warmup).
    #[serde(default = "linear")]
    pub lr_schedule: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

fn linear() -> String {
    "linear".into()
}

/// An f32 setting as the f64 of its shortest decimal form, the value the user wrote (0.05 rather than the
/// 0.05000000074505806 a plain conversion gives).
pub fn f32_as_given(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

fn serialize_as_given<S: serde::Serializer>(v: &f32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(f32_as_given(*v))
}

/// A setting out of range: its field name in [`TrainSettings`] and what was expected of it.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub problem: String,
}

impl std::fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.problem)
    }
}

impl std::error::Error for InvalidSetting {}

impl TrainSettings {
    /// Every value in its range; the first that is not.
    pub fn validate(&self) -> std::result::Result<(), InvalidSetting> {
        let at_least =
            |v: usize, min: usize| if v >= min { Ok(()) } else { Err(format!("must be at least {min}, got {v}")) };
        let positive =
            |v: f64| if v > 0.0 && v.is_finite() { Ok(()) } else { Err(format!("must be a positive number, got {v}")) };
        let share = |v: f64| if (0.0..1.0).contains(&v) { Ok(()) } else { Err(format!("must be in [0, 1), got {v}")) };
        let checks: [(&'static str, std::result::Result<(), String>); 12] = [
            ("epochs", at_least(self.epochs, 1)),
            ("lr", positive(self.lr)),
            ("rank", at_least(self.rank, 1)),
            ("alpha", positive(self.alpha)),
            ("dropout", share(f32_as_given(self.dropout))),
            ("batch_size", at_least(self.batch_size, 1)),
            ("grad_accum", at_least(self.grad_accum, 1)),
            ("max_len", at_least(self.max_len, 2)),
            ("warmup_ratio", share(self.warmup_ratio)),
            (
                "lr_schedule",
                match self.lr_schedule.as_str() {
                    "linear" | "constant" => Ok(()),
                    other => Err(format!("must be linear or constant, got {other}")),
                },
            ),
            (
                "weight_decay",
                match self.weight_decay {
                    w if w >= 0.0 && w.is_finite() => Ok(()),
                    w => Err(format!("must be a number of at least 0, got {w}")),
                },
            ),
            ("max_grad_norm", positive(self.max_grad_norm)),
        ];
        match checks.into_iter().find(|(_, r)| r.is_err()) {
            Some((setting, Err(problem))) => Err(InvalidSetting { setting, problem }),
            _ => Ok(()),
        }
    }
}

/// One optimizer step's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// Held-out metrics: mean loss over response tokens, its perplexity, teacher-forced next-token accuracy on the
/// response, and the exact-match rate of greedy answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub token_accuracy: f64,
    pub exact_match: f64,
    pub examples: usize,
    pub generations: Vec<String>,
}

/// Everything a checkpoint needs to continue, and everything the results file reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub settings: TrainSettings,
    pub model: String,
    pub data: String,
    pub data_sha256: String,
    pub step: usize,
    pub total_steps: usize,
    pub history: Vec<StepRecord>,
    pub train_seconds: f64,
    pub tokens_trained: usize,
    pub before: Option<EvalMetrics>,
    /// Data-parallel ranks the steps were counted for (a step of 2 ranks holds twice the examples).
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// AdamW updates made (its bias correction counts them); 0 in checkpoints that predate it: `step`.
    #[serde(default)]
    pub updates: usize,
}

/// Where `step` of a run of `from` ranks is in a run of `to` ranks (`per_epoch_*` steps per epoch each): the
/// same epoch, and the same share of the epoch's micro-batches done.
pub fn map_step(step: usize, per_epoch_from: usize, from: usize, per_epoch_to: usize, to: usize) -> usize {
    let (epoch, within) = (step / per_epoch_from.max(1), step % per_epoch_from.max(1));
    // Rounded down: a few examples run again rather than some not at all.
    epoch * per_epoch_to + (within * from / to.max(1)).min(per_epoch_to)
}

/// The world size of records and checkpoints written before there were several ranks.
pub(crate) fn one_rank() -> usize {
    1
}

/// What this rank did itself over a run (the step records hold the sums over all ranks).
#[derive(Debug, Clone, Default)]
pub struct RankTotals {
    /// Summed loss over this rank's answer tokens, and their count.
    pub nll: f64,
    pub targets: usize,
    pub tokens: usize,
    pub seconds: f64,
}

pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C; the checkpoint folder.
    Interrupted(PathBuf),
}

/// Observer of each finished optimizer step (record, total steps).
pub type StepObserver<'a> = Box<dyn FnMut(&StepRecord, usize) + 'a>;

/// Hooks and observers around the loop.
pub struct Hooks<'a> {
    pub interrupt: Arc<AtomicBool>,
    /// Called after each optimizer step (progress display).
    pub on_step: StepObserver<'a>,
    /// Called after each backward pass, when the graph and gradients are alive, to sample memory.
    pub on_memory: Box<dyn FnMut() + 'a>,
    /// Test hook: make the loss of this step NaN, as a diverging run would.
    pub inject_nan_at_step: Option<usize>,
}

/// `ids` `[b, T]` (u32, right-padded with 0) and `labels` `[b, T]` (i64, -100 on padding).
pub fn batch_tensors(batch: &[&Tokenized], device: &Device) -> Result<(Tensor, Tensor)> {
    let len = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * len);
    let mut labels = Vec::with_capacity(batch.len() * len);
    for t in batch {
        ids.extend_from_slice(&t.ids);
        ids.extend(std::iter::repeat_n(0u32, len - t.ids.len()));
        labels.extend_from_slice(&t.labels);
        labels.extend(std::iter::repeat_n(IGNORE, len - t.labels.len()));
    }
    Ok((
        Tensor::from_vec(ids, (batch.len(), len), device)?,
        Tensor::from_vec(labels, (batch.len(), len), &Device::Cpu)?,
    ))
}

/// Linear warmup, then linear decay to zero (transformers' default "linear" schedule) or constant.
pub fn learning_rate(s: &TrainSettings, step: usize, total: usize) -> f64 {
    let warmup = (s.warmup_ratio * total as f64).ceil() as usize;
    if step < warmup {
        s.lr * (step + 1) as f64 / warmup as f64
    } else if s.lr_schedule == "constant" {
        s.lr
    } else {
        s.lr * (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Optimizer steps per epoch when `world` ranks each run `grad_accum` micro-batches of `batch_size` per step.
pub fn steps_per_epoch(n_train: usize, s: &TrainSettings, world: usize) -> usize {
    n_train.div_ceil(s.batch_size).div_ceil(s.grad_accum * world.max(1))
}

/// The micro-batches (indices into the training set) of optimizer step `step` over all `world` ranks: rank `r`
/// runs those at `r`, `r + world`, …; the order of each epoch is a seeded shuffle, so a resumed run sees exactly
/// the batches the interrupted one would have, and `world` ranks with batch `b` see the examples that one rank
/// with batch `world · b` sees.
pub fn step_batches(n_train: usize, s: &TrainSettings, step: usize, world: usize) -> Vec<Vec<usize>> {
    let per_step = s.grad_accum * world.max(1);
    let per_epoch = steps_per_epoch(n_train, s, world);
    let (epoch, within) = (step / per_epoch, step % per_epoch);
    let mut order: Vec<usize> = (0..n_train).collect();
    super::data::shuffle(&mut order, s.seed.wrapping_add(epoch as u64 + 1));
    let batches: Vec<Vec<usize>> = order.chunks(s.batch_size).map(|c| c.to_vec()).collect();
    batches.into_iter().skip(within * per_step).take(per_step).collect()
}

/// Sum of NLL, correct argmax predictions and count over labelled targets (labels shifted by one).
fn response_stats(logits: &Tensor, labels: &Tensor) -> Result<(f64, usize, usize)> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets) = labelled_rows(labels, v)?;
    if rows.is_empty() {
        return Ok((0.0, 0, 0));
    }
    let device = logits.device();
    let picked = logits.reshape((b * t, v))?.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    let target = Tensor::new(targets.as_slice(), device)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let nll = logp.gather(&target.unsqueeze(1)?, 1)?.neg()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let argmax: Vec<u32> = picked.argmax(D::Minus1)?.to_vec1()?;
    let correct = argmax.iter().zip(&targets).filter(|(a, b)| a == b).count();
    Ok((nll, correct, targets.len()))
}

/// Evaluate the model as it stands (attach the adapter to evaluate first). `n_generations` of the examples
/// also have their generated answers returned.
/// Held-out answers generated together (rows of one refilled batch).
const GENERATION_ROWS: usize = 16;

pub fn evaluate(
    model: &Model,
    renderer: &Renderer,
    examples: &[Example],
    tokenized: &[Tokenized],
    batch_size: usize,
    eos_ids: &[u32],
    n_generations: usize,
) -> Result<EvalMetrics> {
    let (mut nll, mut correct, mut count) = (0.0, 0, 0);
    for chunk in tokenized.chunks(batch_size) {
        let refs: Vec<&Tokenized> = chunk.iter().collect();
        let (ids, labels) = batch_tensors(&refs, model.device())?;
        let mut cache = model.new_cache();
        let logits = model.forward(&ids, &mut cache)?;
        let (n, c, k) = response_stats(&logits, &labels)?;
        nll += n;
        correct += c;
        count += k;
    }
    let loss = nll / count.max(1) as f64;
    // The held-out answers, greedy, all examples decoded together in a refilled batch (each as it would be
    // alone); an example whose prompt and answer budget do not fit the context window is skipped.
    let stop_strings: Vec<String> = if renderer.template.is_fallback() { vec!["\nUser:".into()] } else { vec![] };
    let mut requests = vec![];
    let mut which = vec![];
    for (i, ex) in examples.iter().enumerate() {
        let prompt = renderer.prompt_ids(ex)?;
        let answer_len = renderer.tokenizer.encode(ex.answer(), false)?.len();
        let max_tokens = (answer_len + 8).min(128);
        if prompt.len() + max_tokens > model.config().max_position_embeddings {
            continue;
        }
        let stop_strings = stop_strings.clone();
        requests.push(BatchRequest { prompt, max_tokens, stop_strings, sampling: SamplingParams::default() });
        which.push(i);
    }
    let mut texts: Vec<Option<String>> = vec![None; requests.len()];
    let params = BatchParams { batch: GENERATION_ROWS, eos_ids: eos_ids.to_vec(), interrupt: None };
    generate_batch(model, Some(renderer.tokenizer), &requests, &params, |r, out| {
        texts[r] = Some(out.text.trim().to_string());
        Ok(())
    })?;
    let mut exact = 0;
    let mut generations = vec![];
    for (&i, text) in which.iter().zip(texts) {
        let text = text.unwrap_or_default();
        if text == examples[i].answer().trim() {
            exact += 1;
        }
        if i < n_generations {
            generations.push(text);
        }
    }
    Ok(EvalMetrics {
        loss,
        perplexity: loss.exp(),
        token_accuracy: correct as f64 / count.max(1) as f64,
        exact_match: exact as f64 / examples.len().max(1) as f64,
        examples: examples.len(),
        generations,
    })
}

/// The file a checkpoint folder holds once everything else in it is written: a folder without it is never
/// resumed from.
pub const CHECKPOINT_COMPLETE: &str = "checkpoint_complete";

/// The trainer state of a checkpoint folder written by [`Trainer::save_checkpoint`], refused when the folder
/// lacks its completion marker.
pub fn checkpoint_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    if !dir.is_dir() {
        bail!("{}: no such folder (expected the checkpoint folder of an interrupted run)", dir.display());
    }
    if !dir.join(CHECKPOINT_COMPLETE).is_file() {
        bail!("{}: an incomplete checkpoint (no {CHECKPOINT_COMPLETE} marker: its save was cut short)", dir.display());
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", p.display()))
}

/// The training run: the model with its adapter, the data, and where things go.
pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub lora: Lora,
    pub optimizer: AdamW,
    pub train: Vec<Tokenized>,
    pub state: TrainerState,
    pub out_dir: PathBuf,
    /// Test hook: wait this long between a checkpoint written in full and its rename into place.
    pub pause_in_save: Option<std::time::Duration>,
    /// The data-parallel ranks this one trains with (`None`: alone). Each runs its share of every step's
    /// micro-batches; the gradients are summed over the ranks before the (identical) optimizer step.
    pub group: Option<&'a Group>,
    pub totals: RankTotals,
    /// Activation checkpointing (`--checkpointing`): keep each layer's input only and run the layer again in
    /// the backward pass (see `Model::checkpointed_gradients`).
    pub checkpointing: bool,
}

impl<'a> Trainer<'a> {
    pub fn new(
        model: &'a mut Model,
        lora: Lora,
        train: Vec<Tokenized>,
        state: TrainerState,
        out: &Path,
    ) -> Result<Self> {
        let params = AdamWParams { weight_decay: state.settings.weight_decay, ..Default::default() };
        let optimizer = AdamW::new(lora.vars(), params)?;
        Ok(Self {
            model,
            lora,
            optimizer,
            train,
            state,
            out_dir: out.to_path_buf(),
            pause_in_save: None,
            group: None,
            totals: RankTotals::default(),
            checkpointing: false,
        })
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.out_dir.join("checkpoint")
    }

    /// Continue from a checkpoint folder written by [`Trainer::save_checkpoint`].
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let saved = Lora::load_for(dir, self.model.config(), self.model.device())?;
        self.lora.load_values(&saved)?;
        let opt_path = dir.join("optimizer.safetensors");
        let state = candle_core::safetensors::load(&opt_path, self.model.device())
            .with_context(|| format!("{}: cannot read", opt_path.display()))?;
        let names = self.lora.var_names();
        let updates = if self.state.updates > 0 { self.state.updates } else { self.state.step };
        self.optimizer.load_state(&names, &state.into_iter().collect(), updates)?;
        Ok(())
    }

    /// Adapter + optimizer moments + trainer state + the completion marker, written to a temporary folder
    /// beside the checkpoint and swapped into place: the checkpoint folder is the previous one or this one,
    /// whole, whenever the process stops.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.checkpoint_dir();
        // Every rank holds the same adapter and moments: rank 0 writes them, the others wait until it has.
        if let Some(g) = self.group.filter(|g| g.world() > 1) {
            if g.is_main() {
                self.write_checkpoint(&dir)?;
            }
            g.barrier()?;
            return Ok(dir);
        }
        self.write_checkpoint(&dir)?;
        Ok(dir)
    }

    fn write_checkpoint(&self, dir: &Path) -> Result<()> {
        let dir = dir.to_path_buf();
        let tmp = temp_path_beside(&dir);
        let _ = std::fs::remove_dir_all(&tmp);
        self.lora.save_for(&tmp, self.model.config())?;
        let opt = self.optimizer.state(&self.lora.var_names())?;
        save_safetensors_atomic(&tmp.join("optimizer.safetensors"), &opt)?;
        write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(&self.state)?.as_bytes())?;
        let marker = format!("step {} of {}\n", self.state.step, self.state.total_steps);
        write_atomic(&tmp.join(CHECKPOINT_COMPLETE), marker.as_bytes())?;
        publish(&tmp, &dir, self.pause_in_save)?;
        Ok(())
    }

    /// Run the remaining optimizer steps. The loss of a step is the mean over every answer token of the step's
    /// micro-batches, on every rank (token-weighted, as transformers accumulates since 4.46): each micro-batch
    /// adds its tokens' summed loss divided by the step's token count, so accumulation and ranks change nothing
    /// but the rounding.
    pub fn run(&mut self, hooks: &mut Hooks) -> Result<Outcome> {
        let single = Group::single();
        let group = self.group.unwrap_or(&single);
        let (rank, world) = (group.rank(), group.world());
        let s = self.state.settings.clone();
        let total = self.state.total_steps;
        let per_epoch = steps_per_epoch(self.train.len(), &s, world);
        let vars = self.lora.vars();
        let device = self.model.device().clone();
        self.model.set_ops(Ops::Differentiable);
        self.lora.attach_trainable(self.model, s.dropout)?;
        // Every micro-batch's gradients go straight into one flat vector, made once for the whole run.
        let flat = self.optimizer.gradient_buffer()?;
        while self.state.step < total {
            let step = self.state.step;
            let started = Instant::now();
            let batches = step_batches(self.train.len(), &s, step, world);
            let step_targets: usize = batches.iter().flatten().map(|&i| self.train[i].trained_tokens()).sum();
            // Whether `flat` holds this step's gradients yet (the first micro-batch writes, later ones add).
            let mut filled = false;
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            for batch in batches.iter().skip(rank).step_by(world) {
                let refs: Vec<&Tokenized> = batch.iter().map(|&i| &self.train[i]).collect();
                tokens += refs.iter().map(|t| t.ids.len()).sum::<usize>();
                let targets: usize = refs.iter().map(|t| t.trained_tokens()).sum();
                if targets == 0 {
                    continue; // every answer was cut by --max-len
                }
                let (ids, labels) = batch_tensors(&refs, &device)?;
                // Only the positions that predict an answer token go through the head.
                let (rows, answer) = labelled_rows(&labels, self.model.config().vocab_size)?;
                let rows = Tensor::new(rows.as_slice(), &device)?;
                let answer = Tensor::new(answer.as_slice(), &device)?;
                // The micro-batch's share of the step's token-weighted mean.
                let weight = 1.0 / step_targets as f64;
                let out = if self.checkpointing {
                    self.model.checkpointed_gradients(&ids, &rows, &answer, weight, &vars)?
                } else {
                    let mut cache = self.model.new_cache();
                    let loss = (self.model.nll_rows(&ids, &mut cache, &rows, &answer)?.sum_all()? * weight)?;
                    let store = loss.backward()?;
                    // Sampled while the graph and the gradients are alive.
                    (hooks.on_memory)();
                    // Detached: a gradient carrying a graph would keep this step's activations alive.
                    let grads = vars.iter().map(|v| store.get(v.as_tensor()).map(Tensor::detach)).collect();
                    Gradients { loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads }
                };
                let mut value = out.loss;
                if hooks.inject_nan_at_step == Some(step + 1) {
                    value = f64::NAN;
                }
                loss_sum += value;
                self.totals.nll += value * step_targets as f64;
                self.totals.targets += targets;
                if !value.is_finite() {
                    break; // the ranks stop together, below
                }
                if self.checkpointing {
                    (hooks.on_memory)();
                }
                if out.grads.iter().any(Option::is_none) {
                    bail!("an adapter parameter received no gradient");
                }
                self.optimizer.gather_grads(&flat, &out.grads, filled)?;
                filled = true;
            }
            if !filled {
                // No micro-batch of this rank had an answer token: it adds nothing to the step.
                self.optimizer.gather_grads(&flat, &vec![None; vars.len()], false)?;
            }
            self.totals.tokens += tokens;
            // One exchange per step: the loss, the tokens run, and whether any rank was asked to stop.
            let stop_here = hooks.interrupt.load(Ordering::Relaxed) as u8 as f64;
            let summed = group.sum_f64(&[loss_sum, tokens as f64, stop_here])?;
            let (loss_sum, tokens, stop) = (summed[0], summed[1] as usize, summed[2] > 0.0);
            if !loss_sum.is_finite() {
                return Err(self.diverged(step, "loss", loss_sum));
            }
            let summed = group.sum_tensor(&flat)?;
            let grad_norm = grad_norm(&summed)?;
            if !grad_norm.is_finite() {
                return Err(self.diverged(step, "gradient norm", grad_norm));
            }
            let lr = learning_rate(&s, step, total);
            self.optimizer.step_scaled(&summed, clip_scale(grad_norm, s.max_grad_norm), lr)?;
            let seconds = started.elapsed().as_secs_f64();
            self.totals.seconds += seconds;
            let rec = StepRecord {
                step: step + 1,
                epoch: (step + 1) as f64 / per_epoch as f64,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens,
                seconds,
            };
            self.state.step += 1;
            self.state.updates = self.state.updates.max(step) + 1;
            self.state.train_seconds += seconds;
            self.state.tokens_trained += tokens;
            (hooks.on_step)(&rec, total);
            self.state.history.push(rec);
            if stop && self.state.step < total {
                return Ok(Outcome::Interrupted(self.save_checkpoint()?));
            }
        }
        Ok(Outcome::Finished)
    }

    /// Save the adapter as it was before the failing step and describe the failure.
    fn diverged(&self, step: usize, what: &str, value: f64) -> anyhow::Error {
        let main = self.group.is_none_or(|g| g.is_main());
        let saved = if main { self.lora.save_for(&self.out_dir, self.model.config()) } else { Ok(()) };
        let kept = match saved {
            Ok(()) => format!("the last good adapter (after step {step}) is in {}", self.out_dir.display()),
            Err(e) => format!("saving the last good adapter failed too: {e}"),
        };
        anyhow::anyhow!(
            "training stopped: the {what} became {value} at step {} of {}; {kept}; try a lower learning rate",
            step + 1,
            self.state.total_steps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TrainSettings {
        TrainSettings {
            epochs: 2,
            lr: 1e-3,
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into()],
            dropout: 0.0,
            batch_size: 4,
            grad_accum: 2,
            max_len: 64,
            seed: 1,
            warmup_ratio: 0.0,
            lr_schedule: "linear".into(),
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }

    #[test]
    fn every_example_once_per_epoch() {
        let s = settings();
        let per = steps_per_epoch(21, &s, 1);
        assert_eq!(per, 3); // 6 micro-batches of ≤ 4, 2 per step
        for epoch in 0..2 {
            let mut seen: Vec<usize> =
                (0..per).flat_map(|k| step_batches(21, &s, epoch * per + k, 1)).flatten().collect();
            seen.sort();
            assert_eq!(seen, (0..21).collect::<Vec<_>>());
        }
        assert_ne!(step_batches(21, &s, 0, 1), step_batches(21, &s, per, 1), "each epoch reshuffles");
    }

    #[test]
    fn a_step_maps_to_the_same_place_at_another_world_size() {
        // 21 examples in batches of 4: 6 micro-batches an epoch; 4 ranks take 2 steps an epoch, 1 rank 6.
        assert_eq!(map_step(2, 2, 4, 6, 1), 6, "the start of epoch 1");
        assert_eq!(map_step(1, 2, 4, 6, 1), 4, "half of epoch 0 done: 4 micro-batches");
        assert_eq!(map_step(3, 6, 1, 3, 2), 1, "3 of 6 micro-batches done: step 1 of 3 (the third runs again)");
        assert_eq!(map_step(6, 6, 1, 3, 2), 3);
    }

    #[test]
    fn ranks_share_the_examples_of_one_larger_batch() {
        let mut one = settings();
        one.batch_size = 4;
        one.grad_accum = 1;
        let mut two = one.clone();
        two.batch_size = 2;
        assert_eq!(steps_per_epoch(21, &one, 1), steps_per_epoch(21, &two, 2));
        for step in 0..steps_per_epoch(21, &one, 1) {
            let mut a: Vec<usize> = step_batches(21, &one, step, 1).concat();
            let mut b: Vec<usize> = step_batches(21, &two, step, 2).concat();
            a.sort();
            b.sort();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let mut s = settings();
        s.warmup_ratio = 0.1;
        assert!((learning_rate(&s, 0, 100) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&s, 9, 100) - 1e-3).abs() < 1e-12);
        assert!(learning_rate(&s, 99, 100) > 0.0 && learning_rate(&s, 99, 100) < 2e-5);
    }
}

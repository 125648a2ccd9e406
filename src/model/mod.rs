//! The model core: configuration, weights, the linear seam (dense or quantized, with an adapter slot), the KV
//! cache, and the trunk every architecture shares (embedding → layers → final norm → LM head). The layers
//! themselves live in one file per architecture under `arch/`.

pub mod adapter;
pub mod arch;
pub mod batch_graph;
pub mod cache;
pub mod config;
pub mod cpu_forward;
pub mod decode_graph;
pub mod layers;
pub mod linear;
pub mod quant;
pub mod weights;

pub use arch::Architecture;
pub use cache::KvCache;
pub use config::ModelConfig;
pub use layers::Ops;
pub use linear::Linear;

use anyhow::Result;
use arch::{Layers, RowSpans, Step};
use batch_graph::BatchEngine;
use candle_core::{DType, Device, Module, Tensor, D};
use decode_graph::{GraphEngine, GraphParts, GraphSlot, SingleRowEngine};
use layers::{causal_mask_for, select_positions, Embedding, Norm, Rotary};
use weights::Weights;

/// Set `BILLION_CUDA_PASS=0` to run prefill and scoring passes on the GPU through the regular forward pass
/// (tensor ops) instead of the batched step's kernels (for comparisons).
pub const PASS_ENV: &str = "BILLION_CUDA_PASS";

/// A causal language model of any supported architecture.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Box<dyn Layers>,
    final_norm: Norm,
    lm_head: Linear,
    rotary: Rotary,
    /// The CUDA-graph decode step, built on first use by models whose layers have its shape.
    graph: GraphSlot<SingleRowEngine>,
    /// The CUDA-graph decode step of a batch of rows, built on first use likewise.
    batch_graph: GraphSlot<BatchEngine>,
    /// The CPU decode step of one row on buffers of its own (no tensor ops), built on first use likewise.
    cpu_forward: GraphSlot<cpu_forward::Engine>,
    /// Passes of several tokens per row on the GPU through the batched step's kernels (see
    /// [`PASS_ENV`]); off, they take the regular forward pass (tests compare the two).
    cuda_pass: std::sync::atomic::AtomicBool,
    device: Device,
    dtype: DType,
    ops: Ops,
    weight_bytes: usize,
}

impl Model {
    pub fn build(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let spec = cfg.architecture.spec();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = w.embedding(spec.trunk.embed, v, h)?;
        let layers = (spec.build)(cfg, w)?;
        let final_norm = match cfg.norm {
            config::NormKind::Rms => w.rms_norm(spec.trunk.final_norm, h, cfg.norm_eps)?,
            config::NormKind::Layer => w.layer_norm(spec.trunk.final_norm, h, cfg.norm_eps, true)?,
        };
        let lm_head = w.lm_head(spec.trunk.lm_head, &embed, v, h, cfg.tie_word_embeddings)?;
        let rotary = Rotary::new(cfg, w.dtype, &w.device)?;
        let mut m = Self {
            cfg: cfg.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            rotary,
            graph: GraphSlot::default(),
            batch_graph: GraphSlot::default(),
            cpu_forward: GraphSlot::default(),
            cuda_pass: (!std::env::var(PASS_ENV).is_ok_and(|v| v == "0")).into(),
            device: w.device.clone(),
            dtype: w.dtype,
            ops: Ops::Fused,
            weight_bytes: 0,
        };
        let head = match (&m.embed, m.lm_head.is_quantized()) {
            _ if !cfg.tie_word_embeddings => m.lm_head.weight_bytes(),
            // `--quantize` made a quantized copy of the tied embedding for the head.
            (Embedding::Dense(_), true) => m.lm_head.weight_bytes(),
            // Otherwise the head reads the embedding's own storage.
            _ => 0,
        } + m.embed.bytes();
        let linears = m.linears_mut();
        let linear_bytes: usize = linears.iter().map(|(_, l)| l.weight_bytes()).sum();
        let linear_params: usize = linears.iter().map(|(_, l)| l.in_features() * l.out_features()).sum();
        // Norms and biases: every parameter outside the embedding, head and linear matrices, in the compute dtype.
        let matrices = linear_params + cfg.vocab_size * cfg.hidden_size * if cfg.tie_word_embeddings { 1 } else { 2 };
        let other = (cfg.parameter_count() as usize).saturating_sub(matrices) * w.dtype.size_in_bytes();
        m.weight_bytes = head + linear_bytes + other;
        Ok(m)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Select fused (inference) or differentiable (training) ops.
    pub fn set_ops(&mut self, ops: Ops) {
        self.ops = ops;
    }

    /// A fresh KV cache sized for this model's context window.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers, self.cfg.max_position_embeddings)
    }

    /// The trunk: embedding, the architecture's layers, final norm and head (for the `positions` asked for);
    /// the cache advances once.
    fn run(&self, ids: &Tensor, cache: &mut KvCache, positions: Positions) -> candle_core::Result<Tensor> {
        let (batch, t) = ids.dims2()?;
        cache.check_room(t)?;
        let x = self.embed.forward(ids)?;
        if t == 1 && self.ops == Ops::Fused && x.device().is_cuda() {
            let logits = if batch == 1 && !cache.has_spans() {
                self.graph.step(|| self.graph_parts(), &x, cache)?
            } else if cache.prefix_len() == 0 {
                self.batch_graph.step(|| self.graph_parts(), &x, cache)?
            } else {
                None
            };
            if let Some(logits) = logits {
                return self.cast_logits(logits);
            }
        }
        let tail = match positions {
            Positions::All => Some(t),
            Positions::Last => Some(1),
            Positions::Tail(n) => Some(n),
            Positions::Rows(_) => None,
        };
        // Several new tokens per row on the GPU (prefill, scoring): the batched step's kernels over every token.
        if let (Some(tail), true) = (tail, t > 1 && self.ops == Ops::Fused && x.device().is_cuda() && self.cuda_pass())
        {
            if let Some(Some(logits)) = self.batch_graph.with(|| self.graph_parts(), &x, |e| e.pass(&x, cache, tail))? {
                return self.cast_logits(logits);
            }
        }
        // One sequence on the CPU: our own pass (decode steps and prefill), for the positions it can return.
        let ours = self.ops == Ops::Fused && x.device().is_cpu();
        if let (Some(tail), true) = (tail, ours && batch == 1 && !cache.has_spans()) {
            if let Some(logits) = self.cpu_forward.with(|| self.graph_parts(), &x, |e| e.run(&x, cache, tail))? {
                return self.cast_logits(logits);
            }
        }
        // A decode step of a batch (rows at their own columns, no shared prefix): each row as alone. Also one
        // row whose columns start past the first (a batch shrunk to its last live row): the tensor ops would
        // give it other roundings than it gets alone.
        if ours && t == 1 && matches!(positions, Positions::Last) && cache.prefix_len() == 0 {
            if let Some(logits) = self.cpu_forward.with(|| self.graph_parts(), &x, |e| e.run_rows(&x, cache))? {
                return self.cast_logits(logits);
            }
        }
        let x = self.trunk(x, cache, positions)?;
        // The head sees only the selected rows; it takes the path the layers took for the whole pass, so a
        // row's logits do not depend on how many rows were selected (or batched).
        let logits = if Linear::many_rows(batch * t) {
            self.lm_head.forward_as_many_rows(&x)?
        } else {
            self.lm_head.forward(&x)?
        };
        self.cast_logits(logits)
    }

    /// The layers through tensor ops, then the final norm at the `positions` asked for; the cache advances
    /// once.
    fn trunk(&self, x: Tensor, cache: &mut KvCache, positions: Positions) -> candle_core::Result<Tensor> {
        let _training = (self.ops == Ops::Differentiable).then(crate::model::linear::TrainingProducts::hold);
        #[cfg(feature = "cuda")]
        if self.ops == Ops::Differentiable && self.device.is_cuda() {
            crate::ops::fused::cuda::install_grad_add();
        }
        let (batch, t, _) = x.dims3()?;
        let offset = cache.len();
        // Rows of different lengths or a shared prefix: per-row positions and visible spans.
        let (mask, spans) = if cache.has_spans() {
            if self.ops == Ops::Differentiable || (!cache.starts().is_empty() && cache.starts().len() != batch) {
                candle_core::bail!("rows of different lengths need inference ops and one start per row");
            }
            let angles = self.rotary.angles_at(&cache.positions(batch, t, &Device::Cpu)?)?;
            (None, Some(RowSpans { angles, starts: cache.starts_tensor(batch, x.device())? }))
        } else {
            (causal_mask_for(t, offset, &x, self.ops)?, None)
        };
        let mut step = Step { cache, offset, mask, rotary: &self.rotary, ops: self.ops, spans };
        let x = self.layers.forward(x, &mut step)?;
        cache.advance(t);
        let x = match positions {
            Positions::All => x,
            Positions::Last => select_positions(&x, false)?,
            Positions::Tail(n) => x.narrow(1, t - n, n)?.contiguous()?,
            Positions::Rows(rows) => {
                let hidden = x.dim(D::Minus1)?;
                crate::ops::autograd::select_rows(&x.reshape((batch * t, hidden))?, rows)?
            }
        };
        self.final_norm.forward(&x, self.ops)
    }

    /// The per-row negative log-likelihood `[rows]` (f32) of `targets` at the positions `rows`.
    fn head_loss(&self, x: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let head = &self.lm_head;
        crate::ops::autograd::head_cross_entropy(
            x,
            targets,
            self.cfg.vocab_size,
            |rows| head.frozen_forward(rows),
            |rows, d| head.frozen_input_grad(rows, d),
        )
    }

    fn cuda_pass(&self) -> bool {
        self.cuda_pass.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Passes of several tokens per row on the GPU through our kernels (`true`, the default unless [`PASS_ENV`]
    /// says otherwise) or through the regular forward pass (the reference the tests compare with).
    pub fn set_cuda_pass(&self, on: bool) {
        self.cuda_pass.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn cast_logits(&self, logits: Tensor) -> candle_core::Result<Tensor> {
        match self.ops {
            Ops::Fused => logits.to_dtype(DType::F32),
            // Training selects the labelled rows first and casts those (a full f32 copy of every position's
            // logits would be the largest tensor of the step).
            Ops::Differentiable => Ok(logits),
        }
    }

    fn graph_parts(&self) -> Option<GraphParts<'_>> {
        Some(GraphParts {
            cfg: &self.cfg,
            layers: self.layers.graph_layers()?,
            final_norm: &self.final_norm,
            lm_head: &self.lm_head,
            inv_freq: self.rotary.inv_freq(),
            interleaved: self.rotary.interleaved(),
        })
    }

    /// Logits at every given position: `ids` `[b, t]` → `[b, t, vocab]` (f32; in the compute dtype with
    /// `Ops::Differentiable`). Appends to `cache`.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.run(ids, cache, Positions::All)
    }

    /// Logits at the last position only: `[b, vocab]` (f32). Appends all of `ids` to `cache`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.run(ids, cache, Positions::Last)?.squeeze(1)
    }

    /// Logits at the last `n` positions only (1 ≤ n ≤ the new tokens): `[b, n, vocab]` (f32). Scoring a
    /// continuation needs the logits of its own positions, not the context's. Appends all of `ids` to `cache`.
    pub fn forward_tail(&self, ids: &Tensor, cache: &mut KvCache, n: usize) -> candle_core::Result<Tensor> {
        let t = ids.dim(1)?;
        if n == 0 || n > t {
            candle_core::bail!("forward_tail: {n} positions asked of {t} new tokens");
        }
        self.run(ids, cache, Positions::Tail(n))
    }

    /// Logits at the positions `rows` (u32, `b · t + position` of `ids` `[b, t]`) only: `[rows, vocab]`. Training
    /// asks for the positions that predict an answer token: the head (the largest product when answers are
    /// short) and its gradient cover those rows, not every position. Appends all of `ids` to `cache`.
    pub fn forward_rows(&self, ids: &Tensor, cache: &mut KvCache, rows: &Tensor) -> candle_core::Result<Tensor> {
        self.run(ids, cache, Positions::Rows(rows))
    }

    /// The training loss of the positions `rows` (as for [`Model::forward_rows`]) against `targets` (u32, one
    /// per row): each row's negative log-likelihood, `[rows]` f32. The head and the cross-entropy are one op
    /// (`ops::autograd::head_cross_entropy`): the logits of all rows never exist at once and the graph keeps
    /// none. Appends all of `ids` to `cache`.
    pub fn nll_rows(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        rows: &Tensor,
        targets: &Tensor,
    ) -> candle_core::Result<Tensor> {
        cache.check_room(ids.dim(1)?)?;
        let x = self.trunk(self.embed.forward(ids)?, cache, Positions::Rows(rows))?;
        self.head_loss(&x, targets)
    }

    /// One backward pass with activation checkpointing: the gradient of `weight · Σ nll_rows(ids, rows,
    /// targets)` for each of `vars` (`None` where one gets none), and that loss. The forward pass keeps only
    /// each layer's input (and the adapters' dropout masks); the backward pass runs each layer again, last
    /// to first, with its graph, and takes that layer's gradients from it. Memory for activations drops
    /// from every layer's intermediates to one layer's, for a second forward pass of the layers.
    pub fn checkpointed_gradients(
        &self,
        ids: &Tensor,
        rows: &Tensor,
        targets: &Tensor,
        weight: f64,
        vars: &[candle_core::Var],
    ) -> candle_core::Result<Gradients> {
        use crate::model::linear::dropout_tape;
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            crate::ops::fused::cuda::install_grad_add();
        }
        if self.ops != Ops::Differentiable {
            candle_core::bail!("activation checkpointing needs the differentiable ops");
        }
        let _training = crate::model::linear::TrainingProducts::hold();
        let (batch, t) = ids.dims2()?;
        let x = self.embed.forward(ids)?;
        let mask = causal_mask_for(t, 0, &x, self.ops)?;
        // Each layer runs on a cache of its own: nothing of a pass outlives its layer.
        let layer = |i: usize, x: Tensor| -> candle_core::Result<Tensor> {
            let mut scratch = self.new_cache();
            let mut step = Step {
                cache: &mut scratch,
                offset: 0,
                mask: mask.clone(),
                rotary: &self.rotary,
                ops: self.ops,
                spans: None,
            };
            self.layers.forward_layer(i, x, &mut step)
        };
        let layers = self.layers.num_layers();
        let mut inputs = Vec::with_capacity(layers);
        let mut x = x;
        for i in 0..layers {
            let (y, masks) = dropout_tape::record(|| layer(i, x.clone()));
            inputs.push((x, masks));
            // Detached: the layer's graph (its intermediates) goes now.
            x = y?.detach();
        }
        let last = candle_core::Var::from_tensor(&x)?;
        drop(x);
        let hidden = last.as_tensor().dim(D::Minus1)?;
        let selected = last.as_tensor().reshape((batch * t, hidden))?.index_select(rows, 0)?;
        let loss = (self.head_loss(&self.final_norm.forward(&selected, self.ops)?, targets)?.sum_all()? * weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut add = |store: &candle_core::backprop::GradStore| -> candle_core::Result<()> {
            for (slot, var) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.detach();
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g,
                    });
                }
            }
            Ok(())
        };
        add(&store)?;
        let mut upstream = store.get(last.as_tensor()).map(|g| g.detach());
        drop(store);
        while let Some((input, masks)) = inputs.pop() {
            let Some(g) = upstream.take() else { break };
            let i = inputs.len();
            // The first layer's input is the embedding, which learns nothing: no gradient for it.
            let var = if i > 0 { Some(candle_core::Var::from_tensor(&input)?) } else { None };
            let x = var.as_ref().map_or(input, |v| v.as_tensor().clone());
            let y = dropout_tape::replay(masks, || layer(i, x))?;
            // d(y · g)/dθ: the layer's share of the loss's gradient, with g the gradient of its output.
            let store = (y * &g)?.sum_all()?.backward()?;
            add(&store)?;
            upstream = var.and_then(|v| store.get(v.as_tensor()).map(|g| g.detach()));
        }
        Ok(Gradients { loss: value, grads })
    }

    /// Start a batch of prompts of different lengths in an empty `cache`: each is padded on the left to the
    /// longest (the padding is never attended to and positions count from each prompt's first token). Returns
    /// the logits at each prompt's last token, `[rows, vocab]`; later steps take `[rows, 1]` as usual.
    pub fn prefill_rows(&self, prompts: &[&[u32]], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if longest == 0 || prompts.iter().any(|p| p.is_empty()) {
            candle_core::bail!("every prompt of a batch needs at least one token");
        }
        // On the CPU through our own pass: each prompt alone, then side by side, so that a batch's rows hold
        // what a prompt alone holds (and decode on from there as alone, see `cpu_forward::Engine::run_rows`).
        if self.device.is_cpu() && self.ops == Ops::Fused && cache.is_empty() && cache.prefix_len() == 0 {
            let mut alone = vec![];
            let mut logits = vec![];
            for p in prompts {
                let mut c = self.new_cache().with_capacity(p.len());
                let x = self.embed.forward(&self.input(p)?)?;
                match self.cpu_forward.with(|| self.graph_parts(), &x, |e| e.run(&x, &mut c, 1))? {
                    Some(l) => logits.push(self.cast_logits(l)?.squeeze(0)?),
                    None => break,
                }
                alone.push(c);
            }
            if alone.len() == prompts.len() {
                cache.gather_rows(&alone)?;
                return Tensor::cat(&logits, 0);
            }
        }
        let starts: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        // Padding columns hold token 0; what they compute is masked out.
        let ids: Vec<u32> =
            prompts.iter().flat_map(|p| std::iter::repeat_n(0, longest - p.len()).chain(p.iter().copied())).collect();
        cache.set_starts(starts)?;
        let ids = Tensor::from_vec(ids, (prompts.len(), longest), &self.device)?;
        self.forward_last(&ids, cache)
    }

    /// Convenience: token ids as a `[1, t]` tensor on this model's device.
    pub fn input(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        Tensor::new(ids, &self.device)?.unsqueeze(0)
    }

    /// All linear layers by their Hugging Face module names (the seam LoRA plugs into).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        // Adapters may be attached or weights replaced: the decode graph must be rebuilt.
        self.graph.reset();
        self.batch_graph.reset();
        self.cpu_forward.reset();
        let prefix = self.cfg.architecture.spec().trunk.layers;
        self.layers.linears_mut().into_iter().map(|(name, l)| (format!("{prefix}.{name}"), l)).collect()
    }

    /// Bytes of weights held on the device (quantized sizes where quantized).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

/// A training pass's loss and gradients (what [`Model::checkpointed_gradients`] gives back).
pub struct Gradients {
    /// The weighted loss.
    pub loss: f64,
    /// Each variable's gradient, in the order asked for; `None` where one got none.
    pub grads: Vec<Option<Tensor>>,
}

/// Which positions of a pass go through the final norm and the head.
#[derive(Clone, Copy)]
enum Positions<'a> {
    All,
    Last,
    /// The last n positions.
    Tail(usize),
    /// Flattened `b · t + position` indices (u32).
    Rows(&'a Tensor),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of a batch are independent: each row's logits equal that sequence run alone (last position and
    /// every position, prefill and a decode step), for every architecture.
    /// Prompts of different lengths in one batch (padded on the left): every row's logits, at the prefill and
    /// at each greedy step after it, equal that prompt run alone.
    #[test]
    fn rows_of_different_lengths_equal_single_sequences() -> Result<()> {
        rows_of_different_lengths(&Device::Cpu, DType::F32, 1e-4)
    }

    /// The same on the GPU (`cargo test --features cuda` where one is present), in bf16.
    #[cfg(feature = "cuda")]
    #[test]
    fn rows_of_different_lengths_on_cuda() -> Result<()> {
        match crate::testing::cuda_device() {
            Some(gpu) => rows_of_different_lengths(&gpu, DType::BF16, 0.1),
            None => Ok(()),
        }
    }

    fn rows_of_different_lengths(device: &Device, dtype: DType, tolerance: f32) -> Result<()> {
        for spec in arch::REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, dtype, device))?;
            let prompts: [&[u32]; 3] = [&[1, 7, 3, 9, 12], &[4, 4], &[8, 2, 6, 5, 11, 13, 21]];
            let mut cache = m.new_cache();
            let mut logits = m.prefill_rows(&prompts, &mut cache)?;
            let mut alone: Vec<(KvCache, Tensor)> = prompts
                .iter()
                .map(|p| {
                    let mut c = m.new_cache();
                    let l = m.forward_last(&m.input(p)?, &mut c)?;
                    Ok((c, l))
                })
                .collect::<Result<_>>()?;
            for step in 0..6 {
                let mut next = vec![];
                for (r, (c, l)) in alone.iter_mut().enumerate() {
                    let d = (logits.narrow(0, r, 1)? - &*l)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(d < tolerance, "{}: row {r} differs by {d} at step {step}", spec.name);
                    let token = l.argmax(1)?.to_vec1::<u32>()?[0];
                    *l = m.forward_last(&m.input(&[token])?, c)?;
                    next.push(token);
                }
                let ids = Tensor::from_vec(next, (prompts.len(), 1), device)?;
                logits = m.forward_last(&ids, &mut cache)?;
            }
        }
        Ok(())
    }

    /// Activation checkpointing gives the gradients of the whole graph: every architecture, adapters on every
    /// linear layer with dropout (the layers run again must drop what the first pass dropped), f32, rows of
    /// two sequences through the fused head + loss.
    #[test]
    fn checkpointed_gradients_equal_the_whole_graph() -> Result<()> {
        use crate::model::adapter::{Lora, LoraConfig};
        use crate::model::linear::dropout_tape;
        let device = Device::Cpu;
        for spec in arch::REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
            let mut m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &device))?;
            let config = LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: vec!["all-linear".into()],
                lora_dropout: 0.3,
                base_model_name_or_path: None,
            };
            let lora = Lora::init(&mut m, config, 3)?;
            // B starts at zero: give it values so that every gradient is non-zero.
            for (i, (_, _, b)) in lora.params.iter().enumerate() {
                b.set(&crate::testing::seeded_randn(300 + i as u64, 0.0, 0.1, b.dims()))?;
            }
            m.set_ops(Ops::Differentiable);
            lora.attach_trainable(&mut m, 0.3)?;
            let ids = Tensor::new(&[[3u32, 9, 27, 81, 243, 5, 15, 45], [2, 4, 8, 16, 32, 64, 128, 256]], &device)?;
            let rows = Tensor::new(&[2u32, 5, 6, 9, 12, 15], &device)?;
            let targets = Tensor::new(&[7u32, 1, 300, 42, 0, 99], &device)?;
            let vars = lora.vars();
            let (whole, masks) = dropout_tape::record(|| -> Result<(f64, Vec<Tensor>)> {
                let loss = (m.nll_rows(&ids, &mut m.new_cache(), &rows, &targets)?.sum_all()? * 0.25)?;
                let store = loss.backward()?;
                let grads = vars.iter().map(|v| store.get(v.as_tensor()).expect("a gradient").clone()).collect();
                Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
            });
            let (loss, whole) = whole?;
            assert_eq!(masks.len(), lora.params.len(), "one dropout mask per adapter");
            let ours = dropout_tape::replay(masks, || m.checkpointed_gradients(&ids, &rows, &targets, 0.25, &vars))?;
            assert!((ours.loss - loss).abs() <= 1e-6 * loss.abs(), "{}: loss {} vs {loss}", spec.name, ours.loss);
            for (i, (a, b)) in ours.grads.iter().zip(&whole).enumerate() {
                let a = a.as_ref().expect("every adapter gets a gradient");
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let largest = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(largest > 0.0, "{}: gradient {i} is zero", spec.name);
                assert!(d <= 1e-5 * largest, "{}: gradient {i} off by {d} (largest {largest})", spec.name);
            }
        }
        Ok(())
    }

    /// On quantized weights too the checkpointed pass's loss is the whole graph's: every frozen product is the
    /// dequantized model's, tracked input or not (`TrainingProducts`; the inference kernels' 8-bit activations
    /// took the projections of untracked inputs — every layer's first pass under checkpointing — before).
    #[test]
    fn checkpointed_loss_equals_the_whole_graphs_on_quantized_weights() -> Result<()> {
        use crate::model::adapter::{Lora, LoraConfig};
        let device = Device::Cpu;
        let cfg = ModelConfig::from_hf_json(&(arch::REGISTRY[0].tiny_config)(320))?;
        for q in [quant::Quantize::Q4_0, quant::Quantize::Q8_0] {
            let weights = Weights::random(cfg.architecture, DType::F32, &device).with_quantize(Some(q));
            let mut m = Model::build(&cfg, &weights)?;
            let config = LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                lora_dropout: 0.0,
                base_model_name_or_path: None,
            };
            let lora = Lora::init(&mut m, config, 3)?;
            m.set_ops(Ops::Differentiable);
            lora.attach_trainable(&mut m, 0.0)?;
            let ids = Tensor::new(&[[3u32, 9, 27, 81, 243, 5, 15, 45], [2, 4, 8, 16, 32, 64, 128, 256]], &device)?;
            let rows = Tensor::new(&[2u32, 5, 6, 9, 12, 15], &device)?;
            let targets = Tensor::new(&[7u32, 1, 300, 42, 0, 99], &device)?;
            let whole = m.nll_rows(&ids, &mut m.new_cache(), &rows, &targets)?.sum_all()?.to_scalar::<f32>()? as f64;
            let ours = m.checkpointed_gradients(&ids, &rows, &targets, 1.0, &lora.vars())?;
            // The same products in the same order: equal to the bit (the 8-bit activations moved it by ~1e-7).
            assert_eq!(ours.loss, whole, "{q:?}: checkpointed vs whole");
        }
        Ok(())
    }

    /// Our CPU pass (buffers of its own, no tensor ops) gives the logits of the regular pass: a prefill of
    /// 12 and of 20 tokens (every position's logits, and the last three alone) and 8 decode steps after it, for every architecture on packed
    /// 8- and 4-bit, K-quant and f32 weights, and for GGUF f16 and Q6_K files.
    #[test]
    fn cpu_forward_equals_the_regular_pass() -> Result<()> {
        for spec in arch::REGISTRY {
            let mut json = (spec.tiny_config)(320);
            // StableLM-2-1.6B's shape: no per-head q/k norms (a model with them keeps the regular path).
            if json.get("qk_layernorm").is_some() {
                json["qk_layernorm"] = false.into();
            }
            let cfg = ModelConfig::from_hf_json(&json)?;
            for q in [Some(quant::Quantize::Q8_0), Some(quant::Quantize::Q4_0), Some(quant::Quantize::Q4K), None] {
                let w = Weights::random(cfg.architecture, DType::F32, &Device::Cpu).with_quantize(q);
                let mut m = Model::build(&cfg, &w)?;
                cpu_forward_against_regular(&mut m, &format!("{} {q:?}", spec.name), q.is_some())?;
            }
        }
        for dtype in [candle_core::quantized::GgmlDType::F16, candle_core::quantized::GgmlDType::Q6K] {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("tiny.gguf");
            let mut cfg = crate::testing::tiny_config(Architecture::Llama, 320);
            // K-quant rows hold 256 values.
            cfg["hidden_size"] = 256.into();
            cfg["intermediate_size"] = 512.into();
            crate::testing::write_llama_gguf(&path, &cfg, 3, dtype)?;
            let cpu = crate::load::LoadOptions { device: Some(crate::load::DeviceSpec::Cpu), ..Default::default() };
            let mut loaded = crate::load::load(path.to_str().unwrap(), &cpu)?;
            let quantized = dtype != candle_core::quantized::GgmlDType::F16;
            cpu_forward_against_regular(&mut loaded.model, &format!("gguf {dtype:?}"), quantized)?;
        }
        Ok(())
    }

    /// One model (random weights differ from build to build) with our CPU pass switched on and off.
    fn cpu_forward_against_regular(m: &mut Model, name: &str, quantized: bool) -> Result<()> {
        let run = |m: &mut Model, ours: bool, ids: &[u32], cache: &mut KvCache, all: bool| -> Result<Tensor> {
            if ours {
                m.cpu_forward.reset();
            } else {
                m.cpu_forward.disable();
            }
            let input = m.input(ids)?;
            let out = if all { m.forward(&input, cache)? } else { m.forward_last(&input, cache)? };
            assert_eq!(m.cpu_forward.is_built(), ours, "{name}: our CPU pass used: {}", !ours);
            Ok(out)
        };
        // The two passes' attention sums in different orders; where a product quantizes its input to 8 bits,
        // an ulp there can flip one rounding (~1e-3 of the logits on these tiny models). A wrong pass is off
        // by the logits' own size.
        let tolerance = if quantized { 1e-2 } else { 2e-4 };
        let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= tolerance * scale.max(1.0), "{name}: {what} differs by {d} (of {scale})");
            Ok(())
        };
        // Held throughout, so that a test beside this one taking or dropping it cannot switch one pass's
        // product path: 12 rows take the 8-bit kernels, 20 rows the f32 tiles, either way.
        let _exact = linear::ExactScoring::hold();
        let vocab = m.config().vocab_size as u32;
        for len in [12, 20] {
            let prompt: Vec<u32> = (0..len).map(|i| (i * 37 + 5) % vocab).collect();
            let (mut c1, mut c2) = (m.new_cache(), m.new_cache());
            let a = run(m, true, &prompt, &mut c1, true)?;
            let b = run(m, false, &prompt, &mut c2, true)?;
            assert_eq!(a.dims(), b.dims());
            close(&a, &b, &format!("prefill of {len}"))?;
            // Only the last positions' logits: the same rows.
            m.cpu_forward.reset();
            let tail = m.forward_tail(&m.input(&prompt)?, &mut m.new_cache(), 3)?;
            assert!(m.cpu_forward.is_built());
            close(&tail, &b.narrow(1, len as usize - 3, 3)?, "the last 3 positions")?;
            m.cpu_forward.disable();
            let tail = m.forward_tail(&m.input(&prompt)?, &mut m.new_cache(), 3)?;
            close(&tail, &b.narrow(1, len as usize - 3, 3)?, "the regular pass's last 3 positions")?;
            let mut logits = b.get(0)?.get(prompt.len() - 1)?.unsqueeze(0)?;
            for step in 0..8 {
                let token = logits.argmax(1)?.to_vec1::<u32>()?[0];
                let a = run(m, true, &[token], &mut c1, false)?;
                logits = run(m, false, &[token], &mut c2, false)?;
                close(&a, &logits, &format!("step {step} after {len}"))?;
            }
            assert_eq!(c1.len(), c2.len());
        }
        Ok(())
    }

    /// Rows that share a prefix computed once (held by no row) and continue with suffixes of different
    /// lengths: each row's logits, at the suffix's last token and one step later, equal the whole sequence run
    /// alone.
    #[test]
    fn rows_after_a_shared_prefix_equal_whole_sequences() -> Result<()> {
        for spec in arch::REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &Device::Cpu))?;
            rows_after_a_shared_prefix(&m, spec.name)?;
        }
        // GGUF llama: interleaved rotary pairs and quantized linear layers.
        for dtype in [candle_core::quantized::GgmlDType::F32, candle_core::quantized::GgmlDType::Q4_1] {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("tiny.gguf");
            let cfg = crate::testing::tiny_config(Architecture::Llama, 320);
            crate::testing::write_llama_gguf(&path, &cfg, 3, dtype)?;
            // On the CPU in f32: equality with the sequence alone is exact there (a GPU's bf16 GEMMs round by shape).
            let cpu = crate::load::LoadOptions { device: Some(crate::load::DeviceSpec::Cpu), ..Default::default() };
            let loaded = crate::load::load(path.to_str().unwrap(), &cpu)?;
            rows_after_a_shared_prefix(&loaded.model, &format!("gguf {dtype:?}"))?;
        }
        Ok(())
    }

    /// The same on the GPU in bf16 (llama shapes: the split softmax path), where one is present.
    #[cfg(feature = "cuda")]
    #[test]
    fn rows_after_a_shared_prefix_on_cuda() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        for spec in arch::REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::BF16, &gpu))?;
            rows_after_a_shared_prefix_within(&m, spec.name, 0.1)?;
        }
        Ok(())
    }

    fn rows_after_a_shared_prefix(m: &Model, name: &str) -> Result<()> {
        rows_after_a_shared_prefix_within(m, name, 1e-4)
    }

    fn rows_after_a_shared_prefix_within(m: &Model, name: &str, tolerance: f32) -> Result<()> {
        let prefix: &[u32] = &[5, 9, 14, 2, 33, 8];
        let suffixes: [&[u32]; 3] = [&[1, 7, 3], &[4], &[8, 2, 6, 5, 11]];
        let mut primed = m.new_cache();
        m.forward_last(&m.input(prefix)?, &mut primed)?;
        let shared = std::sync::Arc::new(primed.share_prefix(prefix.len())?);
        let mut cache = m.new_cache();
        cache.set_prefix(shared)?;
        let logits = m.prefill_rows(&suffixes, &mut cache)?;
        let step = m.forward_last(&Tensor::new(&[[3u32], [4], [5]], m.device())?, &mut cache)?;
        for (r, suffix) in suffixes.iter().enumerate() {
            let whole: Vec<u32> = prefix.iter().chain(suffix.iter()).copied().collect();
            let mut alone = m.new_cache();
            let want = m.forward_last(&m.input(&whole)?, &mut alone)?;
            let want_step = m.forward_last(&m.input(&[3 + r as u32])?, &mut alone)?;
            let d = (logits.narrow(0, r, 1)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let d_step = (step.narrow(0, r, 1)? - want_step)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < tolerance && d_step < tolerance, "{name}: row {r} differs by {d} / {d_step}");
        }
        Ok(())
    }

    #[test]
    fn batch_rows_equal_single_sequences() -> Result<()> {
        for spec in arch::REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &Device::Cpu))?;
            let rows: [[u32; 4]; 2] = [[1, 7, 3, 9], [4, 4, 2, 8]];
            let batch = Tensor::new(&rows, &Device::Cpu)?;
            let mut cache = m.new_cache();
            let last = m.forward_last(&batch, &mut cache)?;
            let step = m.forward(&Tensor::new(&[[5u32], [6]], &Device::Cpu)?, &mut cache)?;
            for (r, ids) in rows.iter().enumerate() {
                let mut alone = m.new_cache();
                let want = m.forward_last(&m.input(ids.as_slice())?, &mut alone)?;
                let want_step = m.forward(&m.input(&[[5u32, 6][r]])?, &mut alone)?;
                let d = (last.narrow(0, r, 1)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let d_step = (step.narrow(0, r, 1)? - want_step)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5 && d_step < 1e-5, "{}: row {r} differs by {d} / {d_step}", spec.name);
            }
        }
        Ok(())
    }
}

//! The CUDA decode step of one sequence as one replayed CUDA graph.
//!
//! At batch 1 a decode step through candle's ops is ~470 small kernels, each paying host launch work, so
//! the GPU idles about half the step. Here one token's whole step is five kernels per layer of our own
//! (`ops/kernels/kernels.cu`: the norm fused into the following matrix-vector product, QKV and gate/up each in
//! one launch, rope + KV-cache write + attention in one, biases and residual adds in the matvec epilogues),
//! captured once into a CUDA graph and replayed for every token. The position lives in device memory, so the
//! same graph serves every step; a graph is tied to the KV cache buffers it was captured with and is
//! recaptured when the cache grows (amortised: capacity doubles).
//!
//! The layers may be llama's (RMSNorm, q/k/v/o, SwiGLU), StableLM's (LayerNorm with bias, q/k/v biases,
//! partial rotary) or GPT-NeoX's (one per-head query_key_value matrix, GELU MLP, every linear with a bias,
//! parallel residual): norms, biases, activations and the rotary width are arguments of the same kernels.
//!
//! Unmerged LoRA adapters (`--adapter`) ride along: one small launch per adapted matvec computes A·x for all
//! its matrices' adapters, and the matvec adds scale·B·(A·x) to each row in its epilogue.
//!
//! Used for one new token at batch 1, inference ops, on CUDA, with bf16 activations, linear layers whose
//! weights are bf16 or a GGUF type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), and a
//! head dim of 8 to 256 (a power of two). Anything else goes through the regular forward pass, which stays
//! the reference.

use super::cache::KvCache;
use super::config::ModelConfig;
use super::layers::Norm;
use super::linear::Linear;
use candle_core::{Result, Tensor};
use std::sync::Mutex;

/// Set `BILLION_CUDA_GRAPH=0` to decode through the regular forward pass (for comparisons).
pub const DISABLE_ENV: &str = "BILLION_CUDA_GRAPH";

/// Set `BILLION_CUDA_PDL=0` to launch the graph's kernels strictly one after another.
pub const PDL_ENV: &str = "BILLION_CUDA_PDL";

/// The query, key and value projections of a layer as the graph reads them.
pub enum QkvLinears<'a> {
    /// Three matrices; their outputs side by side are all query heads, then the key heads, then the values.
    Separate([&'a Linear; 3]),
    /// One matrix whose output rows are grouped per head as [q | k | v] (GPT-NeoX's `query_key_value`).
    PerHead(&'a Linear),
}

/// One layer as the graph reads it: pre-norm attention (q, k, v, o) and a pre-norm MLP, gated
/// (`down(act(gate) · up)`) or plain (`down(act(up))`); norms RMSNorm or LayerNorm, linear biases allowed.
pub struct GraphLayer<'a> {
    pub attn_norm: &'a Norm,
    pub qkv: QkvLinears<'a>,
    pub o: &'a Linear,
    /// With `parallel_residual` the MLP's norm reads the layer's input (x + attn(x) + mlp(x)); otherwise the
    /// input plus the attention's output.
    pub mlp_norm: &'a Norm,
    pub gate: Option<&'a Linear>,
    pub up: &'a Linear,
    pub down: &'a Linear,
    pub parallel_residual: bool,
}

/// The parts of a model the graph reads (weights are shared, not copied).
pub struct GraphParts<'a> {
    pub cfg: &'a ModelConfig,
    pub layers: Vec<GraphLayer<'a>>,
    pub final_norm: &'a Norm,
    pub lm_head: &'a Linear,
    pub inv_freq: &'a [f32],
    pub interleaved: bool,
}

/// A CUDA-graph decode step a [`GraphSlot`] builds on first use.
pub trait GraphEngine: Sized {
    /// The engine for these model parts, or `None` where the model or input does not qualify.
    fn build(parts: &GraphParts, embedded: &Tensor) -> Result<Option<Self>>;
    /// One decode step from the new tokens' embeddings; advances `cache`.
    fn step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// A pass of several new tokens per row, with the logits of each row's last `tail` positions
    /// (`[rows, tail, vocab]`); `None` where this engine has no such pass (the regular forward pass runs).
    fn pass(&mut self, _embedded: &Tensor, _cache: &mut KvCache, _tail: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// The batch-1 decode graph engine.
pub type SingleRowEngine = imp::Engine;

/// Lazily built decode graph of one model: built on the first eligible step, dropped when the model's
/// linear layers change (adapters).
pub struct GraphSlot<E> {
    state: Mutex<SlotState<E>>,
}

enum SlotState<E> {
    Unbuilt,
    Unavailable,
    Ready(Box<E>),
}

impl<E> Default for GraphSlot<E> {
    fn default() -> Self {
        Self { state: Mutex::new(SlotState::Unbuilt) }
    }
}

impl<E> std::fmt::Debug for GraphSlot<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphSlot")
    }
}

impl<E: GraphEngine> GraphSlot<E> {
    /// Whether a graph engine was built (the model qualified on its first eligible step).
    pub fn is_built(&self) -> bool {
        matches!(*self.state.lock().expect("graph slot lock"), SlotState::Ready(_))
    }

    /// Never build one: every step takes the regular path (tests compare the two).
    #[cfg(test)]
    pub fn disable(&mut self) {
        *self.state.get_mut().expect("graph slot lock") = SlotState::Unavailable;
    }

    /// `f(engine)` if one was built (tests look inside it).
    #[cfg(test)]
    pub fn built<R>(&self, f: impl FnOnce(&E) -> R) -> Option<R> {
        match &*self.state.lock().expect("graph slot lock") {
            SlotState::Ready(engine) => Some(f(engine)),
            _ => None,
        }
    }

    /// `f(engine)` if one was built, mutably (tests switch its choices).
    #[cfg(test)]
    pub fn built_mut<R>(&self, f: impl FnOnce(&mut E) -> R) -> Option<R> {
        match &mut *self.state.lock().expect("graph slot lock") {
            SlotState::Ready(engine) => Some(f(engine)),
            _ => None,
        }
    }

    /// Forget the built graph (the weights it points at may change).
    pub fn reset(&mut self) {
        *self.state.get_mut().expect("graph slot lock") = SlotState::Unbuilt;
    }

    /// `f(engine)` with the engine built for these parts on first use; `None` where the model or input does
    /// not qualify.
    pub fn with<'a, R>(
        &self,
        parts: impl FnOnce() -> Option<GraphParts<'a>>,
        embedded: &Tensor,
        f: impl FnOnce(&mut E) -> Result<R>,
    ) -> Result<Option<R>> {
        let mut state = self.state.lock().expect("graph slot lock");
        if matches!(*state, SlotState::Unbuilt) {
            let engine = match parts() {
                Some(p) => E::build(&p, embedded)?,
                None => None,
            };
            *state = match engine {
                Some(e) => SlotState::Ready(Box::new(e)),
                None => SlotState::Unavailable,
            };
        }
        match &mut *state {
            SlotState::Ready(engine) => f(engine).map(Some),
            _ => Ok(None),
        }
    }

    /// Run one decode step through the graph if this model and input qualify: `embedded` is the new tokens'
    /// embeddings `[rows, 1, hidden]`. Returns `None` to fall back to the regular path.
    pub fn step<'a>(
        &self,
        parts: impl FnOnce() -> Option<GraphParts<'a>>,
        embedded: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        self.with(parts, embedded, |engine| engine.step(embedded, cache))
    }
}

/// Without CUDA there is no graph: every step takes the regular path.
#[cfg(not(feature = "cuda"))]
pub enum NoGraph {}

#[cfg(not(feature = "cuda"))]
impl GraphEngine for NoGraph {
    fn build(_: &GraphParts, _: &Tensor) -> Result<Option<Self>> {
        Ok(None)
    }

    fn step(&mut self, _: &Tensor, _: &mut KvCache) -> Result<Tensor> {
        match *self {}
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub type Engine = super::NoGraph;
}

/// The batch-1 engine, and the weight gathering and eligibility both CUDA engines share.
#[cfg(feature = "cuda")]
pub(crate) mod imp {
    use super::*;
    use crate::model::config::Activation;
    use crate::model::linear::LinearWeight;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaFunction, CudaGraph, CudaSlice, CudaStream};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Storage};
    use half::bf16;
    use std::sync::Arc;

    use crate::ops::fused::cuda::kernel;
    use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};

    const WARPS: u32 = 8;
    /// Matvec blocks per SM (bf16 / quantized weights): the kernels' launch bounds.
    const MV_BLOCKS_PER_SM: u32 = 4;
    const MV_QUANT_BLOCKS_PER_SM: u32 = 2;
    /// Attention threads per block, one per cached position: a cache of capacity C is read by
    /// ceil(C / ATT_THREADS) blocks per head (`ATT_THREADS` in the kernels).
    const ATT_THREADS: u32 = 128;
    /// Graphs kept per model (one per KV cache in use: e.g. a prompt cache and its working copy).
    const MAX_GRAPHS: usize = 4;
    /// Head sizes with an `attention_decode_*` kernel.
    const HEAD_DIMS: [usize; 6] = [8, 16, 32, 64, 128, 256];

    /// Weight formats with matvec kernels (`WT` in the kernels).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Format {
        Bf16,
        Q8_0,
        Q4_0,
        Q4_1,
        Q5_0,
        Q5_1,
        Q4K,
        Q5K,
        Q6K,
    }

    impl Format {
        const ALL: [Format; 9] = [
            Format::Bf16,
            Format::Q8_0,
            Format::Q4_0,
            Format::Q4_1,
            Format::Q5_0,
            Format::Q5_1,
            Format::Q4K,
            Format::Q5K,
            Format::Q6K,
        ];

        fn of(dtype: GgmlDType) -> Option<Self> {
            Some(match dtype {
                GgmlDType::Q8_0 => Format::Q8_0,
                GgmlDType::Q4_0 => Format::Q4_0,
                GgmlDType::Q4_1 => Format::Q4_1,
                GgmlDType::Q5_0 => Format::Q5_0,
                GgmlDType::Q5_1 => Format::Q5_1,
                GgmlDType::Q4K => Format::Q4K,
                GgmlDType::Q5K => Format::Q5K,
                GgmlDType::Q6K => Format::Q6K,
                _ => return None,
            })
        }

        fn prefix(self) -> &'static str {
            match self {
                Format::Bf16 => "mv_bf16",
                Format::Q8_0 => "mv_q8_0",
                Format::Q4_0 => "mv_q4_0",
                Format::Q4_1 => "mv_q4_1",
                Format::Q5_0 => "mv_q5_0",
                Format::Q5_1 => "mv_q5_1",
                Format::Q4K => "mv_q4k",
                Format::Q5K => "mv_q5k",
                Format::Q6K => "mv_q6k",
            }
        }

        /// Weights per block: a row's width must be a whole number of them.
        fn block(self) -> usize {
            match self {
                Format::Bf16 => 8,
                Format::Q4K | Format::Q5K | Format::Q6K => 256,
                _ => 32,
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Mat {
        ptr: u64,
        format: Format,
        rows: usize,
        cols: usize,
    }

    type Layer = LayerWeights<Mat>;

    struct Captured {
        key: Vec<u64>,
        graph: CudaGraph,
        _partials: CudaSlice<f32>,
    }

    pub struct Engine {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        /// Tensors whose device memory the graph reads (kept alive here).
        _held: Vec<Tensor>,
        layers: Vec<Layer>,
        final_norm: NormWeights,
        lm_head: Mat,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        /// Rotated dims of each head (the first ones; the rest pass through).
        rotary_dim: usize,
        /// The MLP's activation (`ACT_*` in the kernels).
        activation: i32,
        vocab: usize,
        eps: f32,
        interleaved: bool,
        inv_freq: CudaSlice<f32>,
        embedded: CudaSlice<bf16>,
        residual: CudaSlice<f32>,
        qkv: CudaSlice<f32>,
        attn: CudaSlice<bf16>,
        act: CudaSlice<bf16>,
        logits: CudaSlice<f32>,
        pos: CudaSlice<i32>,
        /// A launch's adapters' A · x, read by the launch after it.
        lora_t: CudaSlice<f32>,
        /// Per head: attention blocks finished (the last one combines the splits and resets it).
        done: CudaSlice<u32>,
        /// Device addresses of the buffers above, taken once: nothing may query them while capturing.
        ptr: Ptrs,
        funcs: std::collections::HashMap<String, CudaFunction>,
        /// Programmatic dependent launch between the step's kernels (compute capability 9.0+).
        pdl: bool,
        /// Streaming multiprocessors: the matvec grids are `sms * MV_BLOCKS_PER_SM` blocks at most.
        sms: u32,
        graphs: Vec<Captured>,
    }

    #[derive(Clone, Copy, Default)]
    struct Ptrs {
        inv_freq: u64,
        embedded: u64,
        residual: u64,
        qkv: u64,
        attn: u64,
        act: u64,
        logits: u64,
        pos: u64,
        done: u64,
        lora_t: u64,
    }

    /// The weight as the kernels read it (its bias and adapter are gathered apart), or `None` if this linear
    /// layer needs the regular path.
    fn mat(l: &Linear, stream: &CudaStream) -> Result<Option<Mat>> {
        let (rows, cols) = (l.out_features(), l.in_features());
        Ok(match l.weight() {
            LinearWeight::Dense(w) if w.dtype() == DType::BF16 && cols.is_multiple_of(8) => {
                Some(Mat { ptr: storage_ptr(w, stream)?, format: Format::Bf16, rows, cols })
            }
            LinearWeight::Quantized(q) => {
                let Some(format) = Format::of(q.dtype()) else { return Ok(None) };
                if !matches!(q.device(), Device::Cuda(_)) {
                    return Ok(None);
                }
                Some(Mat { ptr: q.device_ptr()? as u64, format, rows, cols })
            }
            _ => None,
        })
    }

    /// A norm's bf16 weight (and LayerNorm's bias; 0 where absent) by device pointer.
    #[derive(Clone, Copy)]
    pub(crate) struct NormWeights {
        pub weight: u64,
        pub bias: u64,
        pub layer_norm: bool,
    }

    /// The unmerged LoRA adapters of one launch's matrices: their A stacked (`[rank, in]`, bf16) and a
    /// `[rows, rank]` bf16 matrix holding each matrix's scale·B in its own columns (zeros elsewhere).
    #[derive(Clone, Copy)]
    pub(crate) struct LoraWeights {
        pub a: u64,
        pub b: u64,
        pub rank: usize,
    }

    /// A layer's query/key/value matrices in an engine's form.
    pub(crate) enum QkvMats<M> {
        Separate([M; 3]),
        PerHead(M),
    }

    impl<M> QkvMats<M> {
        pub(crate) fn mats(&self) -> impl Iterator<Item = &M> {
            let (one, three) = match self {
                QkvMats::Separate(ms) => (None, Some(ms.iter())),
                QkvMats::PerHead(m) => (Some(m), None),
            };
            one.into_iter().chain(three.into_iter().flatten())
        }
    }

    /// One layer's weights as a graph engine reads them: norms and biases by device pointer (biases f32, the
    /// rows of a launch's matrices concatenated; 0 where the layer has none), the matrices in the engine's
    /// form `M`.
    pub(crate) struct LayerWeights<M> {
        pub attn_norm: NormWeights,
        pub qkv: QkvMats<M>,
        pub qkv_bias: u64,
        pub o: M,
        pub o_bias: u64,
        pub mlp_norm: NormWeights,
        pub gate: Option<M>,
        pub up: M,
        /// The gate's bias rows, then the up's.
        pub up_bias: u64,
        pub down: M,
        pub down_bias: u64,
        pub parallel_residual: bool,
        /// Adapters of the QKV, O, gate/up and down launches.
        pub lora: [Option<LoraWeights>; 4],
    }

    /// A llama-shaped layer (RMSNorms, separate q/k/v, gated MLP, no biases, sequential residual).
    pub(crate) struct LlamaLayer<M> {
        pub attn_norm: u64,
        pub q: M,
        pub k: M,
        pub v: M,
        pub o: M,
        pub mlp_norm: u64,
        pub gate: M,
        pub up: M,
        pub down: M,
    }

    impl<M> LayerWeights<M> {
        /// The layer as a llama-shaped one, if it is.
        pub(crate) fn into_llama(self) -> Option<LlamaLayer<M>> {
            let biased = [self.qkv_bias, self.o_bias, self.up_bias, self.down_bias].iter().any(|&b| b != 0);
            let plain = !self.attn_norm.layer_norm && !self.mlp_norm.layer_norm && !self.parallel_residual;
            if biased || !plain || self.lora.iter().any(Option::is_some) {
                return None;
            }
            let (QkvMats::Separate([q, k, v]), Some(gate)) = (self.qkv, self.gate) else { return None };
            let (attn_norm, mlp_norm) = (self.attn_norm.weight, self.mlp_norm.weight);
            Some(LlamaLayer { attn_norm, q, k, v, o: self.o, mlp_norm, gate, up: self.up, down: self.down })
        }
    }

    /// What both CUDA engines read of a model, gathered once.
    pub(crate) struct GraphWeights<M> {
        /// The norm weights and biases whose device memory the pointers name (kept alive by the engine).
        pub held: Vec<Tensor>,
        pub layers: Vec<LayerWeights<M>>,
        pub final_norm: NormWeights,
        pub lm_head: M,
        pub eps: f64,
        pub inv_freq: CudaSlice<f32>,
    }

    impl<M> GraphWeights<M> {
        /// The weights of `p`, each matrix in the form `mat` gives it; `None` when the norms' epsilons differ,
        /// the LM head has a bias or an adapter, or `mat` cannot take a matrix (the engine then does not apply).
        pub(crate) fn gather(
            p: &GraphParts,
            device: &CudaDevice,
            stream: &Arc<CudaStream>,
            mat: impl Fn(&Linear, &CudaStream) -> Result<Option<M>>,
        ) -> Result<Option<Self>> {
            if p.lm_head.bias().is_some() || p.lm_head.lora().is_some() {
                return Ok(None);
            }
            let mut held = vec![];
            let mut eps = None;
            let mut hold = |t: Tensor, dtype: DType| -> Result<u64> {
                let t = t.to_dtype(dtype)?.contiguous()?;
                let ptr = storage_ptr(&t, stream)?;
                held.push(t);
                Ok(ptr)
            };
            let mut norm = |n: &Norm, hold: &mut dyn FnMut(Tensor, DType) -> Result<u64>| -> Result<Option<_>> {
                let (weight, bias, e, layer_norm) = match n {
                    Norm::Rms { weight, eps } => (weight, None, *eps, false),
                    Norm::Layer { weight, bias, eps } => (weight, bias.as_ref(), *eps, true),
                };
                if eps.is_some_and(|x| x != e) {
                    return Ok(None);
                }
                eps = Some(e);
                let weight = hold(weight.clone(), DType::BF16)?;
                let bias = match bias {
                    Some(b) => hold(b.clone(), DType::BF16)?,
                    None => 0,
                };
                Ok(Some(NormWeights { weight, bias, layer_norm }))
            };
            // The biases of the matrices one launch multiplies, as one f32 vector (zeros for a matrix without).
            let biases = |ls: &[&Linear], hold: &mut dyn FnMut(Tensor, DType) -> Result<u64>| -> Result<u64> {
                let Some(device) = ls.iter().find_map(|l| l.bias()).map(|b| b.device().clone()) else {
                    return Ok(0);
                };
                let parts = ls
                    .iter()
                    .map(|l| match l.bias() {
                        Some(b) => b.to_dtype(DType::F32)?.flatten_all(),
                        None => Tensor::zeros(l.out_features(), DType::F32, &device),
                    })
                    .collect::<Result<Vec<_>>>()?;
                hold(Tensor::cat(&parts, 0)?, DType::F32)
            };
            // The adapters of the matrices one launch multiplies (`LoraWeights`), if any has one.
            let loras = |ls: &[&Linear], hold: &mut dyn FnMut(Tensor, DType) -> Result<u64>| -> Result<_> {
                let adapted: Vec<_> = ls.iter().filter_map(|l| l.lora()).collect();
                let Some(first) = adapted.first() else { return Ok(None) };
                let rank: usize = adapted.iter().map(|a| a.a.dim(0)).sum::<Result<usize>>()?;
                let a = Tensor::cat(&adapted.iter().map(|a| a.a.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?, 0)?;
                let zeros = |rows: usize, cols: usize| Tensor::zeros((rows, cols), DType::F32, first.b.device());
                let (mut col, mut blocks) = (0, vec![]);
                for l in ls {
                    let out = l.out_features();
                    let Some(ad) = l.lora() else {
                        blocks.push(zeros(out, rank)?);
                        continue;
                    };
                    let r = ad.a.dim(0)?;
                    let mut parts = vec![];
                    if col > 0 {
                        parts.push(zeros(out, col)?);
                    }
                    parts.push((ad.b.to_dtype(DType::F32)? * ad.scale)?);
                    if col + r < rank {
                        parts.push(zeros(out, rank - col - r)?);
                    }
                    blocks.push(Tensor::cat(&parts, 1)?);
                    col += r;
                }
                let b = Tensor::cat(&blocks, 0)?;
                Ok(Some(LoraWeights { a: hold(a, DType::BF16)?, b: hold(b, DType::BF16)?, rank }))
            };
            let mut layers = Vec::with_capacity(p.layers.len());
            for l in &p.layers {
                let (Some(attn_norm), Some(mlp_norm)) = (norm(l.attn_norm, &mut hold)?, norm(l.mlp_norm, &mut hold)?)
                else {
                    return Ok(None);
                };
                let take = |l: &Linear| -> Result<Option<M>> { mat(l, stream) };
                let (qkv, qkv_bias, qkv_lora) = match &l.qkv {
                    QkvLinears::Separate(ls) => {
                        let [q, k, v] = ls;
                        let (Some(q), Some(k), Some(v)) = (take(q)?, take(k)?, take(v)?) else { return Ok(None) };
                        (QkvMats::Separate([q, k, v]), biases(&ls[..], &mut hold)?, loras(&ls[..], &mut hold)?)
                    }
                    QkvLinears::PerHead(qkv) => {
                        let Some(m) = take(qkv)? else { return Ok(None) };
                        (QkvMats::PerHead(m), biases(&[qkv], &mut hold)?, loras(&[qkv], &mut hold)?)
                    }
                };
                let (Some(o), Some(up), Some(down)) = (take(l.o)?, take(l.up)?, take(l.down)?) else {
                    return Ok(None);
                };
                let gate = match l.gate {
                    Some(g) => match take(g)? {
                        Some(m) => Some(m),
                        None => return Ok(None),
                    },
                    None => None,
                };
                let up_linears: Vec<&Linear> = l.gate.into_iter().chain([l.up]).collect();
                layers.push(LayerWeights {
                    attn_norm,
                    qkv,
                    qkv_bias,
                    o,
                    o_bias: biases(&[l.o], &mut hold)?,
                    mlp_norm,
                    gate,
                    up,
                    up_bias: biases(&up_linears, &mut hold)?,
                    down,
                    down_bias: biases(&[l.down], &mut hold)?,
                    parallel_residual: l.parallel_residual,
                    lora: [
                        qkv_lora,
                        loras(&[l.o], &mut hold)?,
                        loras(&up_linears, &mut hold)?,
                        loras(&[l.down], &mut hold)?,
                    ],
                });
            }
            let Some(final_norm) = norm(p.final_norm, &mut hold)? else { return Ok(None) };
            let Some(lm_head) = mat(p.lm_head, stream)? else { return Ok(None) };
            let Some(eps) = eps else { return Ok(None) };
            let mut inv_freq = device.alloc_zeros::<f32>(p.inv_freq.len().max(1))?;
            device.memcpy_htod(p.inv_freq, &mut inv_freq)?;
            Ok(Some(Self { held, layers, final_norm, lm_head, eps, inv_freq }))
        }
    }

    /// Capture what `record` launches on `stream` as a graph, instantiated and uploaded (both engines' steps and
    /// the batch engine's small passes). `what` names it in the error of an empty capture.
    pub(crate) fn capture_graph(
        stream: &Arc<CudaStream>,
        what: &str,
        record: impl FnOnce() -> Result<()>,
    ) -> Result<CudaGraph> {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        let recorded = record();
        // The capture ends even when recording failed, so that the stream is usable again.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(candle_core::Error::wrap)?;
        recorded?;
        let graph = graph.ok_or_else(|| candle_core::Error::Msg(format!("{what}: empty capture")))?;
        graph.upload().map_err(candle_core::Error::wrap)?;
        Ok(graph)
    }

    /// A copy of `shape`'s f32 logits at `src` (a graph's buffer, overwritten by its next replay), as a tensor.
    pub(crate) fn logits_copy(
        device: &CudaDevice,
        stream: &CudaStream,
        src: u64,
        shape: (usize, usize, usize),
    ) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2;
        // SAFETY: `out` is fully written by the copy below before anything reads it (same stream).
        let out = unsafe { device.alloc::<f32>(n)? };
        // SAFETY: `n` f32 values from a live buffer of at least that many into `out`, in stream order.
        unsafe {
            result::memcpy_dtod_async(slice_ptr(&out, stream), src, n * 4, stream.cu_stream())
                .map_err(candle_core::Error::wrap)?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device.clone()));
        Ok(Tensor::from_storage(storage, shape, BackpropOp::none(), false))
    }

    /// The CUDA device `embedded` lives on, if the graph engines apply to this model and input at all (not
    /// turned off, bf16, one of the engine's `head_dims`, at most `max_group` query heads per KV head, a hidden
    /// size of whole 16-byte rows).
    pub(crate) fn graph_device<'a>(
        p: &GraphParts,
        embedded: &'a Tensor,
        head_dims: &[usize],
        max_group: usize,
    ) -> Option<&'a CudaDevice> {
        if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "0") {
            return None;
        }
        let Device::Cuda(device) = embedded.device() else { return None };
        let (hd, nh, nkv) = (p.cfg.head_dim, p.cfg.num_heads, p.cfg.num_kv_heads);
        let fits = embedded.dtype() == DType::BF16
            && head_dims.contains(&hd)
            && p.cfg.rotary_dim <= hd
            && p.cfg.rotary_dim.is_multiple_of(2)
            && nkv != 0
            && nh.is_multiple_of(nkv)
            && nh / nkv <= max_group
            && p.cfg.hidden_size.is_multiple_of(8);
        fits.then_some(device)
    }

    impl GraphEngine for Engine {
        fn build(p: &GraphParts, embedded: &Tensor) -> Result<Option<Self>> {
            Self::new(p, embedded)
        }

        fn step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            self.run_step(embedded, cache)
        }
    }

    impl Engine {
        fn new(p: &GraphParts, embedded: &Tensor) -> Result<Option<Self>> {
            let Some(device) = graph_device(p, embedded, &HEAD_DIMS, usize::MAX) else { return Ok(None) };
            let cfg = p.cfg;
            let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
            let stream = device.cuda_stream();
            let Some(GraphWeights { held, layers, final_norm, lm_head, eps, inv_freq }) =
                GraphWeights::gather(p, device, &stream, mat)?
            else {
                return Ok(None);
            };
            let supported = |m: &Mat| m.cols.is_multiple_of(m.format.block());
            let layer_fits = |l: &Layer| {
                l.gate.is_none_or(|g| g.format == l.up.format)
                    && l.qkv.mats().chain([&l.o, &l.up, &l.down]).chain(l.gate.as_ref()).all(supported)
            };
            // Adapters go with one QKV launch (not with per-matrix ones, as in Q4_K_M files).
            let qkv_split = |l: &Layer| match &l.qkv {
                QkvMats::Separate([q, k, v]) => q.format != k.format || k.format != v.format,
                QkvMats::PerHead(_) => false,
            };
            if !layers.iter().all(|l| layer_fits(l) && !(qkv_split(l) && l.lora[0].is_some())) {
                return Ok(None);
            }
            let max_rank = layers.iter().flat_map(|l| l.lora.iter().flatten().map(|w| w.rank)).max().unwrap_or(0);
            // The kernel-side input buffer is sized by the largest matvec input.
            let max_in = layers.iter().flat_map(|l| [l.down.cols, l.up.cols, l.o.cols]).max().unwrap_or(0);
            if max_in * 2 > 48 * 1024 {
                return Ok(None);
            }
            let activation = match cfg.activation {
                Activation::Silu => 0,
                Activation::Gelu => 1,
                Activation::GeluTanh => 2,
            };
            let h = cfg.hidden_size;
            let inter = layers[0].up.rows;
            let alloc_f32 = |n: usize| device.alloc_zeros::<f32>(n);
            let mut engine = Self {
                device: device.clone(),
                stream: stream.clone(),
                _held: held,
                layers,
                final_norm,
                lm_head,
                hidden: h,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                rotary_dim: cfg.rotary_dim,
                activation,
                vocab: lm_head.rows,
                eps: eps as f32,
                interleaved: p.interleaved,
                inv_freq,
                embedded: device.alloc_zeros::<bf16>(h)?,
                residual: alloc_f32(h)?,
                qkv: alloc_f32((nh + 2 * nkv) * hd)?,
                attn: device.alloc_zeros::<bf16>(nh * hd)?,
                act: device.alloc_zeros::<bf16>(inter)?,
                logits: alloc_f32(lm_head.rows)?,
                pos: device.alloc_zeros::<i32>(1)?,
                done: device.alloc_zeros::<u32>(nh)?,
                lora_t: alloc_f32(max_rank.max(1))?,
                ptr: Ptrs::default(),
                funcs: Default::default(),
                pdl: false,
                sms: 1,
                graphs: vec![],
            };
            let major = stream
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .map_err(candle_core::Error::wrap)?;
            engine.sms = stream
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(candle_core::Error::wrap)? as u32;
            engine.pdl = major >= 9 && !std::env::var(PDL_ENV).is_ok_and(|v| v == "0");
            let st = &*stream;
            engine.ptr = Ptrs {
                inv_freq: slice_ptr(&engine.inv_freq, st),
                embedded: slice_ptr(&engine.embedded, st),
                residual: slice_ptr(&engine.residual, st),
                qkv: slice_ptr(&engine.qkv, st),
                attn: slice_ptr(&engine.attn, st),
                act: slice_ptr(&engine.act, st),
                logits: slice_ptr(&engine.logits, st),
                pos: slice_ptr(&engine.pos, st),
                done: slice_ptr(&engine.done, st),
                lora_t: slice_ptr(&engine.lora_t, st),
            };
            // Load every kernel now: loading a module while the stream captures is not allowed.
            let mut names = vec!["hidden_from_bf16".to_string(), format!("attention_decode_{hd}")];
            for f in Format::ALL {
                for kind in ["norm_store", "store", "resid", "norm_gated", "norm_act"] {
                    names.push(format!("{}_{kind}", f.prefix()));
                }
            }
            for n in names {
                let f = kernel(device, &n)?;
                engine.funcs.insert(n, f);
            }
            Ok(Some(engine))
        }

        fn func(&self, name: &str) -> Result<&CudaFunction> {
            self.funcs.get(name).ok_or_else(|| candle_core::Error::Msg(format!("graph decode: no kernel {name}")))
        }

        /// Launch `name` on the stream; with PDL on, it may start while the previous kernel finishes (the
        /// kernels wait for it before reading anything it wrote).
        fn launch(&self, name: &str, grid: (u32, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
            launch(&self.stream, self.func(name)?, self.pdl, (grid.0, grid.1, 1), block, smem, args)
        }

        /// Record the whole step's kernels on the stream (captured into a graph by the caller). `key` holds
        /// the cache capacity and every layer's key and value buffer addresses.
        fn record(&self, key: &[u64], part: u64) -> Result<()> {
            use Arg::{F, I, P};
            let capacity = key[0] as usize;
            let Ptrs { inv_freq, embedded, residual, qkv, attn, act, logits, pos, done, lora_t } = self.ptr;
            let hd = self.head_dim;
            let splits = capacity.div_ceil(ATT_THREADS as usize) as u32;
            let mv_threads = WARPS * 32;
            // Persistent grid: as many warps as fit (more loads in flight beat an even split of the rows).
            let mv_grid = |m: &Mat, rows: usize| {
                let per_sm = if m.format == Format::Bf16 { MV_BLOCKS_PER_SM } else { MV_QUANT_BLOCKS_PER_SM };
                ((rows as u32).div_ceil(WARPS).min(self.sms * per_sm), 1)
            };
            let n = self.hidden as u32;
            self.launch("hidden_from_bf16", (n.div_ceil(256), 1), 256, 0, &[P(embedded), P(residual), I(n as i32)])?;
            let att = format!("attention_decode_{hd}");
            let (nh, nkv) = (I(self.heads as i32), I(self.kv_heads as i32));
            let q_scale = F(1.0 / (hd as f32).sqrt());
            let rows = |m: &Mat| I(m.rows as i32);
            let cols = |m: &Mat| I(m.cols as i32);
            let smem = |m: &Mat| (m.cols * 2) as u32;
            let norm = |nw: &NormWeights| [P(residual), P(nw.weight), P(nw.bias), I(nw.layer_norm as i32), F(self.eps)];
            // The adapter part of a launch: its B and rank; the launch before it left A·x in `lora_t`.
            let lora = |lw: &Option<LoraWeights>| match lw {
                Some(w) => [P(w.b), P(lora_t), I(w.rank as i32)],
                None => [P(0), P(0), I(0)],
            };
            // A launch's adapters' A as a matrix: `lora_t = A · norm(residual)` or `A · input`.
            let lora_a = |lw: &Option<LoraWeights>, cols: usize| {
                lw.map(|w| Mat { ptr: w.a, format: Format::Bf16, rows: w.rank, cols })
            };
            // `lora_t = A · norm(residual)` for a launch of normed inputs whose matrices have adapters.
            let norm_lora_a = |nw: &NormWeights, lw: &Option<LoraWeights>, width: usize| -> Result<()> {
                let Some(a) = lora_a(lw, width) else { return Ok(()) };
                let args = [P(a.ptr), P(0), P(0), rows(&a), I(0), I(0), cols(&a)];
                let args = [&args[..], &norm(nw), &[P(0), P(lora_t)], &lora(&None)].concat();
                self.launch("mv_bf16_norm_store", mv_grid(&a, a.rows), mv_threads, smem(&a), &args)
            };
            // The norm of the residual times one to three matrices of one format in one launch; f32 results
            // (plus `bias` and the adapters' part) at `out`.
            let norm_store = |ms: &[&Mat], nw: &NormWeights, bias: u64, out: u64, lw: &Option<LoraWeights>| {
                norm_lora_a(nw, lw, ms[0].cols)?;
                let at = |i: usize| ms.get(i).map_or((0, 0), |m| (m.ptr, m.rows));
                let ((p0, n0), (p1, n1), (p2, n2)) = (at(0), at(1), at(2));
                let args = [P(p0), P(p1), P(p2), I(n0 as i32), I(n1 as i32), I(n2 as i32), cols(ms[0])];
                let args = [&args[..], &norm(nw), &[P(bias), P(out)], &lora(lw)].concat();
                let name = format!("{}_norm_store", ms[0].format.prefix());
                self.launch(&name, mv_grid(ms[0], n0 + n1 + n2), mv_threads, smem(ms[0]), &args)
            };
            // residual += m · input (+ bias and the adapter's part)
            let add_product = |m: &Mat, input: u64, bias: u64, lw: &Option<LoraWeights>| -> Result<()> {
                if let Some(a) = lora_a(lw, m.cols) {
                    let args = [P(a.ptr), rows(&a), cols(&a), P(input), P(lora_t)];
                    self.launch("mv_bf16_store", mv_grid(&a, a.rows), mv_threads, smem(&a), &args)?;
                }
                let args = [&[P(m.ptr), rows(m), cols(m), P(input), P(bias), P(residual)][..], &lora(lw)].concat();
                self.launch(&format!("{}_resid", m.format.prefix()), mv_grid(m, m.rows), mv_threads, smem(m), &args)
            };
            for (i, l) in self.layers.iter().enumerate() {
                let (kc, vc) = (key[1 + 2 * i], key[2 + 2 * i]);
                let [qkv_lora, o_lora, up_lora, down_lora] = &l.lora;
                // norm + QKV in one launch (one per matrix where their formats differ, as in Q4_K_M files; the
                // engine takes no adapter there)
                match &l.qkv {
                    QkvMats::Separate([q, k, v]) if q.format == k.format && k.format == v.format => {
                        norm_store(&[q, k, v], &l.attn_norm, l.qkv_bias, qkv, qkv_lora)?
                    }
                    QkvMats::Separate(ms) => {
                        let (mut out, mut bias) = (qkv, l.qkv_bias);
                        for m in ms {
                            norm_store(&[m], &l.attn_norm, bias, out, &None)?;
                            out += (m.rows * 4) as u64;
                            if bias != 0 {
                                bias += (m.rows * 4) as u64;
                            }
                        }
                    }
                    QkvMats::PerHead(m) => norm_store(&[m], &l.attn_norm, l.qkv_bias, qkv, qkv_lora)?,
                }
                // rope + KV write + attention, then O + residual
                let attention = || -> Result<()> {
                    let per_head = matches!(l.qkv, QkvMats::PerHead(_));
                    let args = [P(qkv), P(pos), P(kc), P(vc), I(capacity as i32), nh, nkv, P(inv_freq)];
                    let args = [&args[..], &[I(self.rotary_dim as i32), q_scale, I(self.interleaved as i32)]].concat();
                    let args = [&args[..], &[I(per_head as i32), P(attn), P(part), P(done)]].concat();
                    self.launch(&att, (self.heads as u32, splits), ATT_THREADS, 0, &args)?;
                    add_product(&l.o, attn, l.o_bias, o_lora)
                };
                // norm + gate/up + activation (or up + activation), then down + residual
                let mlp = || -> Result<()> {
                    norm_lora_a(&l.mlp_norm, up_lora, l.up.cols)?;
                    // The gate's rows lead a gated launch (up's rows beside them); a plain one has up's alone.
                    let (m, weights, kind) = match &l.gate {
                        Some(g) => (g, vec![P(g.ptr), P(l.up.ptr)], "norm_gated"),
                        None => (&l.up, vec![P(l.up.ptr)], "norm_act"),
                    };
                    let tail = [P(l.up_bias), I(self.activation), P(act)];
                    let args = [&weights[..], &[rows(m), cols(m)], &norm(&l.mlp_norm), &tail, &lora(up_lora)].concat();
                    let name = format!("{}_{kind}", m.format.prefix());
                    self.launch(&name, mv_grid(m, m.rows), mv_threads, smem(m), &args)?;
                    add_product(&l.down, act, l.down_bias, down_lora)
                };
                // A parallel-residual layer's MLP reads the layer's input, as the QKV norm did: it runs (and
                // adds its output) before the attention adds its own.
                if l.parallel_residual {
                    mlp()?;
                    attention()?;
                } else {
                    attention()?;
                    mlp()?;
                }
            }
            // final norm + LM head
            norm_store(&[&self.lm_head], &self.final_norm, 0, logits, &None)
        }

        fn capture(&self, key: Vec<u64>) -> Result<Captured> {
            let splits = (key[0] as usize).div_ceil(ATT_THREADS as usize);
            let partials = self.device.alloc_zeros::<f32>(self.heads * splits * (self.head_dim + 2))?;
            let s = &self.stream;
            let part = slice_ptr(&partials, s);
            let graph = capture_graph(s, "graph decode", || self.record(&key, part))?;
            Ok(Captured { key, graph, _partials: partials })
        }

        fn run_step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            let pos = cache.len();
            cache.reserve(1, self.kv_heads, self.head_dim, DType::BF16, embedded.device())?;
            let s = self.stream.clone();
            let (k0, _) = cache.layer_buffers(0).ok_or_else(|| candle_core::Error::Msg("empty cache".into()))?;
            let capacity = k0.dim(2)?;
            if k0.dtype() != DType::BF16 {
                candle_core::bail!("graph decode: KV cache is {:?}, expected bf16", k0.dtype());
            }
            let mut key = vec![capacity as u64];
            for i in 0..self.layers.len() {
                let (k, v) = cache.layer_buffers(i).expect("reserved");
                key.push(storage_ptr(k, &s)?);
                key.push(storage_ptr(v, &s)?);
            }
            let idx = match self.graphs.iter().position(|g| g.key == key) {
                Some(i) => i,
                None => {
                    let g = self.capture(key)?;
                    if self.graphs.len() == MAX_GRAPHS {
                        self.graphs.remove(0);
                    }
                    self.graphs.push(g);
                    self.graphs.len() - 1
                }
            };
            // Inputs: the position and the token's embedding row, into the graph's fixed buffers.
            let emb = embedded.flatten_all()?.contiguous()?;
            let emb_ptr = storage_ptr(&emb, &s)?;
            // SAFETY: both destinations are the engine's own buffers of these sizes; the host source is copied
            // before the call returns (pageable memory); `emb` is freed in stream order, after the copy.
            unsafe {
                result::memcpy_htod_async(self.ptr.pos, &[pos as i32], s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
                result::memcpy_dtod_async(self.ptr.embedded, emb_ptr, self.hidden * 2, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
            }
            self.graphs[idx].graph.launch().map_err(candle_core::Error::wrap)?;
            cache.advance(1);
            logits_copy(&self.device, &s, self.ptr.logits, (1, 1, self.vocab))
        }
    }
}

/// The graph against the regular forward pass and against Hugging Face transformers on the GPU (`cargo test
/// --features cuda` where a GPU is present).
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use crate::load::{load, DeviceSpec, LoadOptions};
    use crate::model::{Architecture, Model};
    use candle_core::{DType, Device, Tensor};

    fn cuda() -> bool {
        crate::testing::cuda_device().is_some()
    }

    fn on(device: DeviceSpec, dtype: DType) -> LoadOptions {
        LoadOptions { device: Some(device), dtype: Some(dtype), ..Default::default() }
    }

    fn rms(t: &Tensor) -> f32 {
        t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
    }

    fn argmax(t: &Tensor) -> u32 {
        t.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap()
    }

    /// Prefill `ids[..prompt]` through the regular path, then one step per remaining token (teacher-forced):
    /// the logits of those steps `[ids.len() - prompt, vocab]`, and whether the graph took them.
    fn graph_steps(m: &Model, ids: &[u32], prompt: usize) -> (Tensor, bool) {
        let mut cache = m.new_cache();
        m.forward_last(&m.input(&ids[..prompt]).unwrap(), &mut cache).unwrap();
        let steps: Vec<Tensor> =
            ids[prompt..].iter().map(|&t| m.forward_last(&m.input(&[t]).unwrap(), &mut cache).unwrap()).collect();
        (Tensor::cat(&steps, 0).unwrap(), m.graph.is_built())
    }

    /// Every architecture's graph (llama bf16 and every GGUF type the kernels read; StableLM with q/k/v biases
    /// and 25% rotary; GPT-NeoX parallel and sequential) equals the regular forward pass over the whole
    /// sequence in f32 on the CPU within bf16's rounding (no further from it than the regular GPU path), at
    /// widths of real models' heads.
    #[test]
    fn graph_steps_match_the_regular_forward_pass() {
        if !cuda() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cases = vec![];
        for (name, arch, head_dim) in [
            ("llama", Architecture::Llama, 64),
            ("stablelm", Architecture::StableLm, 64),
            ("gpt_neox parallel", Architecture::GptNeoX, 256),
            ("gpt_neox sequential", Architecture::GptNeoX, 128),
        ] {
            let mut config = crate::testing::tiny_config(arch, 512);
            config["hidden_size"] = 512.into();
            config["num_attention_heads"] = (512 / head_dim).into();
            if arch == Architecture::Llama {
                config["num_key_value_heads"] = (512 / head_dim / 2).into();
            } else if arch == Architecture::StableLm {
                config["num_key_value_heads"] = (512 / head_dim).into();
                config["qk_layernorm"] = false.into();
            }
            config["intermediate_size"] = 1024.into();
            if name.ends_with("sequential") {
                config["use_parallel_residual"] = false.into();
            }
            let p = dir.path().join(name.replace(' ', "_"));
            crate::testing::write_hf_model(&p, &config, 11).unwrap();
            cases.push((name.to_string(), p));
        }
        let mut llama = crate::testing::tiny_config(Architecture::Llama, 512);
        llama["hidden_size"] = 256.into();
        llama["intermediate_size"] = 768.into();
        use candle_core::quantized::GgmlDType;
        for q in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let path = dir.path().join(format!("{q:?}.gguf"));
            crate::testing::write_llama_gguf(&path, &llama, 11, q).unwrap();
            cases.push((format!("llama {q:?}"), path));
        }
        // K-quants need rows of whole 256-weight super-blocks.
        llama["intermediate_size"] = 1024.into();
        for q in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let path = dir.path().join(format!("{q:?}.gguf"));
            crate::testing::write_llama_gguf(&path, &llama, 11, q).unwrap();
            cases.push((format!("llama {q:?}"), path));
        }
        for (name, path) in cases {
            let m = load(path.to_str().unwrap(), &on(DeviceSpec::Cuda(0), DType::BF16)).unwrap().model;
            let cpu = load(path.to_str().unwrap(), &on(DeviceSpec::Cpu, DType::F32)).unwrap().model;
            check_against_f32(&name, &m, &cpu);
        }
    }

    /// Decode 16 steps through the graph after a 40-token prompt and compare their logits with the CPU's f32
    /// path over the whole sequence (quantized weights exactly dequantized there: the most accurate product
    /// we have), beside the regular GPU path's.
    fn check_against_f32(name: &str, m: &Model, cpu: &Model) {
        let ids: Vec<u32> = (0..56).map(|i| (i * 37 % 500 + 3) as u32).collect();
        let (graph, built) = graph_steps(m, &ids, 40);
        assert!(built, "{name}: the decode graph was not used");
        let last16 = |m: &Model| {
            let all = m.forward(&m.input(&ids).unwrap(), &mut m.new_cache()).unwrap();
            all.squeeze(0).unwrap().narrow(0, 40, 16).unwrap().to_device(&Device::Cpu).unwrap()
        };
        let (prefill, f32_path) = (last16(m), last16(cpu));
        let graph = graph.to_device(&Device::Cpu).unwrap();
        let rel = |a: &Tensor| rms(&(a - &f32_path).unwrap()) / rms(&f32_path);
        let (rel_graph, rel_prefill) = (rel(&graph), rel(&prefill));
        eprintln!(
            "{name}: relative RMS difference of 16 steps' logits from the f32 path: graph {rel_graph:.4}, GPU \
             prefill {rel_prefill:.4}"
        );
        // bf16 activations cost ~3% (more with the min terms of Q4_1 / Q5_1): no more than the regular GPU
        // path's own rounding.
        let bound = 0.03f32.max(1.1 * rel_prefill);
        assert!(rel_graph < bound, "{name}: graph logits differ from the f32 path by {rel_graph} (> {bound})");
    }

    /// Unmerged adapters on every linear layer (llama and GPT-NeoX with bf16 weights, llama Q4_K) through the
    /// graph equal the f32 CPU path with the same adapter.
    #[test]
    fn graph_applies_unmerged_adapters() {
        use crate::model::adapter::{Lora, LoraConfig};
        if !cuda() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut llama = crate::testing::tiny_config(Architecture::Llama, 512);
        llama["hidden_size"] = 256.into();
        llama["intermediate_size"] = 768.into();
        let mut neox = crate::testing::tiny_config(Architecture::GptNeoX, 512);
        neox["hidden_size"] = 512.into();
        neox["num_attention_heads"] = 4.into();
        neox["intermediate_size"] = 1024.into();
        let (bf16, neox_dir, q4k) = (dir.path().join("llama"), dir.path().join("neox"), dir.path().join("q4k.gguf"));
        crate::testing::write_hf_model(&bf16, &llama, 5).unwrap();
        crate::testing::write_hf_model(&neox_dir, &neox, 5).unwrap();
        crate::testing::write_llama_gguf(&q4k, &llama, 5, candle_core::quantized::GgmlDType::Q4K).unwrap();
        for (name, path) in [("llama bf16", bf16), ("gpt_neox bf16", neox_dir), ("llama Q4_K", q4k)] {
            let path = path.to_str().unwrap();
            let mut m = load(path, &on(DeviceSpec::Cuda(0), DType::BF16)).unwrap().model;
            let mut cpu = load(path, &on(DeviceSpec::Cpu, DType::F32)).unwrap().model;
            let config = LoraConfig {
                r: 8,
                lora_alpha: 16.0,
                target_modules: vec!["all-linear".into()],
                lora_dropout: 0.0,
                base_model_name_or_path: None,
            };
            // The same A (seeded) on both; B random so the adapter changes the output.
            for (model, dtype) in [(&mut m, DType::BF16), (&mut cpu, DType::F32)] {
                let lora = Lora::init(model, config.clone(), 7).unwrap();
                for (i, (_, _, b)) in lora.params.iter().enumerate() {
                    let values = crate::testing::seeded_randn(100 + i as u64, 0.0, 0.05, b.dims());
                    b.set(&values.to_device(b.device()).unwrap()).unwrap();
                }
                lora.attach_frozen(model, dtype).unwrap();
            }
            check_against_f32(name, &m, &cpu);
        }
    }

    /// The graph on transformers' reference models: teacher-forced along transformers' greedy continuation,
    /// every step's top token is transformers' next token unless our f32 path (equal to transformers' to
    /// ~1e-5, `tests/reference_parity.rs`) puts the top two within the graph's bf16 error; the graph's logits
    /// against that f32 path are reported as max |Δ|.
    #[test]
    fn graph_follows_transformers_greedy_tokens() {
        if !cuda() {
            return;
        }
        let root = std::env::var("BILLION_REFERENCE_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/reference"));
        if !root.exists() {
            eprintln!("skipping: {} not found", root.display());
            return;
        }
        let mut graphs = 0;
        for case in ["llama2-tiny", "llama3-tiny", "stablelm-tiny", "pythia-tiny"] {
            let dir = root.join(case);
            let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
            let ids = |k: &str| -> Vec<u32> { reference[k].to_dtype(DType::U32).unwrap().to_vec1().unwrap() };
            let (prompt, greedy) = (ids("input_ids"), ids("greedy_ids"));
            let seq: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
            let path = dir.to_str().unwrap();
            let gpu = load(path, &on(DeviceSpec::Cuda(0), DType::BF16)).unwrap().model;
            let (graph, built) = graph_steps(&gpu, &seq[..seq.len() - 1], prompt.len() - 1);
            if !built {
                // llama2-tiny's MLP width (86) is not a whole number of 16-byte rows.
                eprintln!("{case}: not a graph shape; regular path");
                continue;
            }
            graphs += 1;
            let cpu = load(path, &on(DeviceSpec::Cpu, DType::F32)).unwrap().model;
            let f32_logits = cpu.forward(&cpu.input(&seq[..seq.len() - 1]).unwrap(), &mut cpu.new_cache()).unwrap();
            let f32_logits = f32_logits.squeeze(0).unwrap().narrow(0, prompt.len() - 1, greedy.len()).unwrap();
            let graph = graph.to_device(&Device::Cpu).unwrap();
            let diff = (&graph - &f32_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let mut agreed = 0;
            for (step, &want) in greedy.iter().enumerate() {
                let row = f32_logits.get(step).unwrap();
                let mut sorted: Vec<f32> = row.to_vec1().unwrap();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let got = argmax(&graph.get(step).unwrap());
                if got == want {
                    agreed += 1;
                } else {
                    assert!(
                        sorted[0] - sorted[1] < 2.0 * diff,
                        "{case} step {step}: graph picks {got}, transformers {want}, margin {} > 2 × max |Δ| {diff}",
                        sorted[0] - sorted[1]
                    );
                }
            }
            eprintln!(
                "{case}: graph vs f32 path max |Δlogit| {diff:.3e}; {agreed}/{} of transformers' greedy tokens \
                 (the rest within the bf16 margin)",
                greedy.len()
            );
        }
        assert!(graphs >= 3, "the graph ran on {graphs} of the reference models");
    }
}

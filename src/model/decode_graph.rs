//! The CUDA decode step of models with llama-shaped layers as one replayed CUDA graph.
//!
//! At batch 1 a decode step through candle's ops is ~470 small kernels, each paying host launch work, so
//! the GPU idles about half the step. Here one token's whole step is five kernels per layer of our own
//! (`ops/kernels/kernels.cu`: RMSNorm fused into the following matrix-vector product, QKV and gate/up each in
//! one launch, rope + KV-cache write + attention in one, residual adds in the matvec epilogues), captured
//! once into a CUDA graph and replayed for every token. The position lives in device memory, so the same
//! graph serves every step; a graph is tied to the KV cache buffers it was captured with and is recaptured
//! when the cache grows (amortised: capacity doubles).
//!
//! Used for one new token at batch 1, inference ops, on CUDA, with bf16 activations, bias-free linear
//! layers without adapters whose weights are bf16, Q8_0, Q4_K or Q6_K, and a head dim of 64, 128 or 256.
//! Anything else goes through the regular forward pass, which stays the reference.

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

/// One layer as the graph reads it: pre-norm attention (q, k, v, o) and a pre-norm gated MLP.
pub struct GraphLayer<'a> {
    pub attn_norm: &'a Norm,
    pub qkvo: [&'a Linear; 4],
    pub mlp_norm: &'a Norm,
    pub gate_up_down: [&'a Linear; 3],
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
    /// Forget the built graph (the weights it points at may change).
    pub fn reset(&mut self) {
        *self.state.get_mut().expect("graph slot lock") = SlotState::Unbuilt;
    }

    /// Run one decode step through the graph if this model and input qualify: `embedded` is the new tokens'
    /// embeddings `[rows, 1, hidden]`. Returns `None` to fall back to the regular path.
    pub fn step<'a>(
        &self,
        parts: impl FnOnce() -> Option<GraphParts<'a>>,
        embedded: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
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
            SlotState::Ready(engine) => engine.step(embedded, cache).map(Some),
            _ => Ok(None),
        }
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
    use crate::model::linear::LinearWeight;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaFunction, CudaGraph, CudaSlice, CudaStream};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Storage};
    use half::bf16;
    use std::sync::Arc;

    use crate::ops::fused::cuda::{MODULE, PTX};
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

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Format {
        Bf16,
        Q8_0,
        Q4K,
        Q6K,
    }

    impl Format {
        fn prefix(self) -> &'static str {
            match self {
                Format::Bf16 => "mv_bf16",
                Format::Q8_0 => "mv_q8_0",
                Format::Q4K => "mv_q4k",
                Format::Q6K => "mv_q6k",
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
        final_norm: u64,
        lm_head: Mat,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
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
    }

    /// The weight as the kernels read it, or `None` if this linear layer needs the regular path.
    fn mat(l: &Linear, stream: &CudaStream) -> Result<Option<Mat>> {
        if l.bias().is_some() || l.lora().is_some() {
            return Ok(None);
        }
        let (rows, cols) = (l.out_features(), l.in_features());
        Ok(match l.weight() {
            LinearWeight::Dense(w) if w.dtype() == DType::BF16 && cols.is_multiple_of(8) => {
                Some(Mat { ptr: storage_ptr(w, stream)?, format: Format::Bf16, rows, cols })
            }
            LinearWeight::Quantized(q) => {
                let format = match q.dtype() {
                    GgmlDType::Q8_0 => Format::Q8_0,
                    GgmlDType::Q4K => Format::Q4K,
                    GgmlDType::Q6K => Format::Q6K,
                    _ => return Ok(None),
                };
                if !matches!(q.device(), Device::Cuda(_)) {
                    return Ok(None);
                }
                Some(Mat { ptr: q.device_ptr()? as u64, format, rows, cols })
            }
            _ => None,
        })
    }

    /// One layer's weights as a graph engine reads them: the norms' bf16 weights by device pointer and the
    /// seven matrices in the engine's form `M`.
    pub(crate) struct LayerWeights<M> {
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

    /// What both CUDA engines read of a model, gathered once.
    pub(crate) struct GraphWeights<M> {
        /// The bf16 norm weights whose device memory the pointers name (kept alive by the engine).
        pub held: Vec<Tensor>,
        pub layers: Vec<LayerWeights<M>>,
        pub final_norm: u64,
        pub lm_head: M,
        pub eps: f64,
        pub inv_freq: CudaSlice<f32>,
    }

    impl<M> GraphWeights<M> {
        /// The weights of `p`, each matrix in the form `mat` gives it; `None` when a norm is not RMSNorm or
        /// `mat` cannot take a matrix (the engine then does not apply).
        pub(crate) fn gather(
            p: &GraphParts,
            device: &CudaDevice,
            stream: &Arc<CudaStream>,
            mat: impl Fn(&Linear, &CudaStream) -> Result<Option<M>>,
        ) -> Result<Option<Self>> {
            let mut held = vec![];
            let mut norm_ptr = |n: &Norm| -> Result<Option<(u64, f64)>> {
                let Norm::Rms { weight, eps } = n else { return Ok(None) };
                let w = weight.to_dtype(DType::BF16)?.contiguous()?;
                let ptr = storage_ptr(&w, stream)?;
                held.push(w);
                Ok(Some((ptr, *eps)))
            };
            let mut layers = Vec::with_capacity(p.layers.len());
            let mut eps = None;
            for GraphLayer { attn_norm: an, qkvo: [q, k, v, o], mlp_norm: mn, gate_up_down: [gate, up, down] } in
                &p.layers
            {
                let (Some((attn_norm, e)), Some((mlp_norm, _))) = (norm_ptr(an)?, norm_ptr(mn)?) else {
                    return Ok(None);
                };
                eps = Some(e);
                let mut ms = vec![];
                for l in [q, k, v, o, gate, up, down] {
                    match mat(l, stream)? {
                        Some(m) => ms.push(m),
                        None => return Ok(None),
                    }
                }
                let [q, k, v, o, gate, up, down]: [M; 7] =
                    ms.try_into().map_err(|_| candle_core::Error::Msg("seven matrices".into()))?;
                layers.push(LayerWeights { attn_norm, q, k, v, o, mlp_norm, gate, up, down });
            }
            let Some((final_norm, _)) = norm_ptr(p.final_norm)? else { return Ok(None) };
            let Some(lm_head) = mat(p.lm_head, stream)? else { return Ok(None) };
            let Some(eps) = eps else { return Ok(None) };
            let mut inv_freq = device.alloc_zeros::<f32>(p.inv_freq.len())?;
            device.memcpy_htod(p.inv_freq, &mut inv_freq)?;
            Ok(Some(Self { held, layers, final_norm, lm_head, eps, inv_freq }))
        }
    }

    /// The CUDA device `embedded` lives on, if the graph engines apply to this model and input at all (not
    /// turned off, bf16, a head size the kernels have, full rotary, at most `max_group` query heads per KV
    /// head, a hidden size of whole 16-byte rows).
    pub(crate) fn graph_device<'a>(p: &GraphParts, embedded: &'a Tensor, max_group: usize) -> Option<&'a CudaDevice> {
        if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "0") {
            return None;
        }
        let Device::Cuda(device) = embedded.device() else { return None };
        let (hd, nh, nkv) = (p.cfg.head_dim, p.cfg.num_heads, p.cfg.num_kv_heads);
        let fits = embedded.dtype() == DType::BF16
            && [64, 128, 256].contains(&hd)
            && p.cfg.rotary_dim == hd
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
            let Some(device) = graph_device(p, embedded, usize::MAX) else { return Ok(None) };
            let cfg = p.cfg;
            let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
            let stream = device.cuda_stream();
            let Some(GraphWeights { held, layers, final_norm, lm_head, eps, inv_freq }) =
                GraphWeights::gather(p, device, &stream, mat)?
            else {
                return Ok(None);
            };
            let supported = |m: &Mat| match m.format {
                Format::Bf16 => m.cols.is_multiple_of(8),
                Format::Q8_0 => m.cols.is_multiple_of(32),
                Format::Q4K | Format::Q6K => m.cols.is_multiple_of(256),
            };
            let layer_fits = |l: &Layer| {
                l.gate.format == l.up.format && [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].iter().all(supported)
            };
            if !layers.iter().all(layer_fits) {
                return Ok(None);
            }
            // The kernel-side input buffer is sized by the largest matvec input.
            let max_in = layers.iter().map(|l| l.down.cols.max(l.q.cols).max(l.o.cols)).max().unwrap_or(0);
            if max_in * 2 > 48 * 1024 {
                return Ok(None);
            }
            let h = cfg.hidden_size;
            let inter = layers[0].gate.rows;
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
            };
            // Load every kernel now: loading a module while the stream captures is not allowed.
            let mut names = vec!["hidden_from_bf16".to_string(), format!("attention_decode_{hd}")];
            for f in [Format::Bf16, Format::Q8_0, Format::Q4K, Format::Q6K] {
                for kind in ["norm_store", "resid", "norm_swiglu"] {
                    names.push(format!("{}_{kind}", f.prefix()));
                }
            }
            for n in names {
                let f = device.get_or_load_custom_func(&n, MODULE, PTX)?.into_cuda_function();
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
            let Ptrs { inv_freq, embedded, residual, qkv, attn, act, logits, pos, done } = self.ptr;
            let eps = F(self.eps);
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
            for (i, l) in self.layers.iter().enumerate() {
                let (kc, vc) = (key[1 + 2 * i], key[2 + 2 * i]);
                // RMSNorm + QKV in one launch (one per matrix where their formats differ, as in Q4_K_M files)
                if l.q.format == l.k.format && l.k.format == l.v.format {
                    let name = format!("{}_norm_store", l.q.format.prefix());
                    let args = [P(l.q.ptr), P(l.k.ptr), P(l.v.ptr), rows(&l.q), rows(&l.k), rows(&l.v), cols(&l.q)];
                    let args = [&args[..], &[P(residual), P(l.attn_norm), eps, P(qkv)]].concat();
                    self.launch(&name, mv_grid(&l.q, l.q.rows + l.k.rows + l.v.rows), mv_threads, smem(&l.q), &args)?;
                } else {
                    let mut out = qkv;
                    for m in [&l.q, &l.k, &l.v] {
                        let name = format!("{}_norm_store", m.format.prefix());
                        let args = [P(m.ptr), P(0), P(0), rows(m), I(0), I(0), cols(m)];
                        let args = [&args[..], &[P(residual), P(l.attn_norm), eps, P(out)]].concat();
                        self.launch(&name, mv_grid(m, m.rows), mv_threads, smem(m), &args)?;
                        out += (m.rows * 4) as u64;
                    }
                }
                // rope + KV write + attention
                let args = [P(qkv), P(pos), P(kc), P(vc), I(capacity as i32), nh, nkv, P(inv_freq), q_scale];
                let args = [&args[..], &[I(self.interleaved as i32), P(attn), P(part), P(done)]].concat();
                self.launch(&att, (self.heads as u32, splits), ATT_THREADS, 0, &args)?;
                // O + residual
                let name = format!("{}_resid", l.o.format.prefix());
                let args = [P(l.o.ptr), rows(&l.o), cols(&l.o), P(attn), P(residual)];
                self.launch(&name, mv_grid(&l.o, l.o.rows), mv_threads, smem(&l.o), &args)?;
                // RMSNorm + gate/up + SwiGLU
                let name = format!("{}_norm_swiglu", l.gate.format.prefix());
                let args =
                    [P(l.gate.ptr), P(l.up.ptr), rows(&l.gate), cols(&l.gate), P(residual), P(l.mlp_norm), eps, P(act)];
                self.launch(&name, mv_grid(&l.gate, l.gate.rows), mv_threads, smem(&l.gate), &args)?;
                // down + residual
                let name = format!("{}_resid", l.down.format.prefix());
                let args = [P(l.down.ptr), rows(&l.down), cols(&l.down), P(act), P(residual)];
                self.launch(&name, mv_grid(&l.down, l.down.rows), mv_threads, smem(&l.down), &args)?;
            }
            // final norm + LM head
            let h = &self.lm_head;
            let name = format!("{}_norm_store", h.format.prefix());
            let args =
                [P(h.ptr), P(0), P(0), rows(h), I(0), I(0), cols(h), P(residual), P(self.final_norm), eps, P(logits)];
            self.launch(&name, mv_grid(h, h.rows), mv_threads, smem(h), &args)
        }

        fn capture(&self, key: Vec<u64>) -> Result<Captured> {
            let splits = (key[0] as usize).div_ceil(ATT_THREADS as usize);
            let partials = self.device.alloc_zeros::<f32>(self.heads * splits * (self.head_dim + 2))?;
            let s = &self.stream;
            let part = slice_ptr(&partials, s);
            s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(candle_core::Error::wrap)?;
            let recorded = self.record(&key, part);
            let graph = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(candle_core::Error::wrap)?;
            recorded?;
            let graph = graph.ok_or_else(|| candle_core::Error::Msg("graph decode: empty capture".into()))?;
            graph.upload().map_err(candle_core::Error::wrap)?;
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
            // The logits buffer is overwritten by the next replay: hand out a copy.
            // SAFETY: `out` is fully written by the copy below before anything reads it (same stream).
            let out = unsafe { self.device.alloc::<f32>(self.vocab)? };
            // SAFETY: `vocab` f32 values from the engine's logits buffer into `out`, in stream order.
            unsafe {
                result::memcpy_dtod_async(slice_ptr(&out, &s), self.ptr.logits, self.vocab * 4, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
            }
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
            Ok(Tensor::from_storage(storage, (1, 1, self.vocab), BackpropOp::none(), false))
        }
    }
}

/// The graph against the regular forward pass on the GPU (`cargo test --features cuda` where a GPU is
/// present): the graph's logits at each decoded token equal those of one prefill over the whole sequence
/// (which never takes the graph), within bf16's rounding.
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use crate::load::{load, DeviceSpec, LoadOptions};
    use candle_core::{DType, Tensor};

    #[test]
    fn graph_steps_match_the_regular_forward_pass() {
        if !candle_core::utils::cuda_is_available() || candle_core::Device::new_cuda(0).is_err() {
            eprintln!("skipping: no CUDA device");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (file, quant) in [("bf16", None), ("q8", Some(candle_core::quantized::GgmlDType::Q8_0))] {
            // head_dim 64 and widths the graph's kernels take.
            let mut config = crate::testing::tiny_config(crate::model::Architecture::Llama, 512);
            config["hidden_size"] = 256.into();
            config["intermediate_size"] = 768.into();
            let path = match quant {
                None => {
                    let p = dir.path().join(file);
                    crate::testing::write_hf_model(&p, &config, 11).unwrap();
                    p
                }
                Some(q) => {
                    let p = dir.path().join(format!("{file}.gguf"));
                    crate::testing::write_llama_gguf(&p, &config, 11, q).unwrap();
                    p
                }
            };
            let opts =
                LoadOptions { device: Some(DeviceSpec::Cuda(0)), dtype: Some(DType::BF16), ..Default::default() };
            let m = load(path.to_str().unwrap(), &opts).unwrap().model;
            let mut ids: Vec<u32> = (0..40).map(|i| (i * 37 % 500 + 3) as u32).collect();
            let prompt_len = ids.len();
            let mut cache = m.new_cache();
            let last = m.forward_last(&m.input(&ids).unwrap(), &mut cache).unwrap();
            ids.push(last.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0]);
            let mut steps = vec![];
            for _ in 0..16 {
                let g = m.forward_last(&m.input(&ids[ids.len() - 1..]).unwrap(), &mut cache).unwrap(); // the graph
                ids.push(g.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0]);
                steps.push(g);
            }
            let graph = Tensor::cat(&steps, 0).unwrap();
            let all = m.forward(&m.input(&ids[..ids.len() - 1]).unwrap(), &mut m.new_cache()).unwrap();
            let reference = all.squeeze(0).unwrap().narrow(0, prompt_len, 16).unwrap();
            let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            let rel = rms(&(&graph - &reference).unwrap()) / rms(&reference);
            eprintln!("{file}: graph vs one prefill, relative RMS difference of 16 steps' logits {rel:.4}");
            assert!(rel < 0.05, "{file}: graph logits differ from the regular forward pass by {rel}");
        }
    }
}

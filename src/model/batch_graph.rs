//! The CUDA decode step of a batch — one new token for each of B rows of different lengths — as one replayed
//! CUDA graph.
//!
//! Through candle's ops a batched step is ~470 launches whose host work (~5 ms) dwarfs the GPU's: at 64 rows
//! the card idles most of the step. Here the step is captured once per batch and replayed: per layer an RMSNorm
//! kernel, cuBLAS GEMMs for the seven matrices (each weight read once for all rows; O and down accumulate
//! straight into the f32 residual), one kernel for rope + KV write + attention over each row's span, and a
//! SwiGLU kernel. The write column and every row's first column live in device memory, so one graph serves
//! every step of a batch; it is tied to the KV buffers it was captured with (a batch's cache is allocated once,
//! so that is once per batch and again when the batch shrinks).
//!
//! Used for one new token per row, inference ops, on CUDA, bf16 weights and activations, llama-shaped layers
//! (RMSNorm, SwiGLU, full rotary) without bias or adapters, no shared prefix, head dim 64, 128 or 256. Anything else takes the regular forward
//! pass, which stays the reference.

/// The batched decode graph engine (built lazily by a `decode_graph::GraphSlot`).
pub type BatchEngine = imp::Engine;

#[cfg(not(feature = "cuda"))]
mod imp {
    pub type Engine = crate::model::decode_graph::NoGraph;
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::model::cache::KvCache;
    use crate::model::config::Activation;
    use crate::model::decode_graph::imp::{graph_device, GraphWeights, LlamaLayer};
    use crate::model::decode_graph::{GraphEngine, GraphParts};
    use crate::model::linear::{Linear, LinearWeight};
    use crate::ops::fused::cuda::{MODULE, PTX};
    use crate::ops::fused::MMA_ATTENTION_ENV;
    use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};
    use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
    use candle_core::cuda_backend::cudarc::driver::{result, CudaFunction, CudaGraph, CudaSlice, CudaStream};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Result, Storage, Tensor};
    use half::bf16;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// Graphs kept per model (one per batch cache in use).
    const MAX_GRAPHS: usize = 8;
    /// cuBLAS workspace of our own handle: it must not be allocated while the stream captures.
    const WORKSPACE_BYTES: usize = 32 << 20;
    /// Query heads per KV group the attention kernel takes (one warp each).
    const MAX_GROUP: usize = 8;
    /// Columns per attention tile (`ROW_TILE` / `MMA_TILE` in the kernels) and the most splits of a row's columns.
    const ATT_TILE: usize = 32;
    const MAX_SPLITS: usize = 16;

    /// A bf16 weight matrix `[rows, cols]` (row-major), read in place.
    #[derive(Clone, Copy)]
    struct Mat {
        ptr: u64,
        rows: usize,
        cols: usize,
    }

    /// The matrices as one, if each directly follows the previous in memory (`Linear::place_side_by_side`).
    fn joined(mats: &[Mat]) -> Option<Mat> {
        let first = *mats.first()?;
        let mut end = first.ptr;
        for m in mats {
            if m.ptr != end || m.cols != first.cols {
                return None;
            }
            end += (m.rows * m.cols * 2) as u64;
        }
        Some(Mat { ptr: first.ptr, rows: mats.iter().map(|m| m.rows).sum(), cols: first.cols })
    }

    type Layer = LlamaLayer<Mat>;

    /// The activations of one batch size, at fixed addresses the graph reads and writes.
    struct Buffers {
        embedded: CudaSlice<bf16>,
        residual: CudaSlice<f32>,
        normed: CudaSlice<bf16>,
        qkv: CudaSlice<bf16>,
        attn: CudaSlice<bf16>,
        gate_up: CudaSlice<bf16>,
        act: CudaSlice<bf16>,
        logits: CudaSlice<f32>,
        /// `[len, start_0, .., start_{rows-1}]`, written before each replay.
        lens: CudaSlice<i32>,
        /// Attention splits' partial results (max, sum, weighted values per row, head and split).
        partials: CudaSlice<f32>,
    }

    struct Captured {
        key: Vec<u64>,
        graph: CudaGraph,
        rows: usize,
        bufs: Buffers,
    }

    pub struct Engine {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        /// Our own cuBLAS handle on the model's stream, with a workspace it never reallocates (declared before
        /// the workspace: dropped first).
        blas: CudaBlas,
        _workspace: CudaSlice<u8>,
        /// Tensors whose device memory the graph reads (kept alive here).
        _held: Vec<Tensor>,
        layers: Vec<Layer>,
        final_norm: u64,
        lm_head: Mat,
        hidden: usize,
        inter: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        vocab: usize,
        eps: f32,
        interleaved: bool,
        inv_freq: CudaSlice<f32>,
        funcs: HashMap<String, CudaFunction>,
        /// Streaming multiprocessors (sizes the attention splits).
        sms: usize,
        /// Attention on tensor cores (head dims 64 and 128), else the CUDA-core tile kernel.
        mma_attention: bool,
        graphs: Vec<Captured>,
    }

    /// The weight as the GEMMs read it, or `None` if this linear layer needs the regular path.
    fn mat(l: &Linear, stream: &CudaStream) -> Result<Option<Mat>> {
        if l.bias().is_some() || l.lora().is_some() {
            return Ok(None);
        }
        Ok(match l.weight() {
            LinearWeight::Dense(w) if w.dtype() == DType::BF16 && w.is_contiguous() => {
                Some(Mat { ptr: storage_ptr(w, stream)?, rows: l.out_features(), cols: l.in_features() })
            }
            _ => None,
        })
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
            let Some(device) = graph_device(p, embedded, &[64, 128, 256], MAX_GROUP) else { return Ok(None) };
            let cfg = p.cfg;
            let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
            if cfg.rotary_dim != hd || cfg.activation != Activation::Silu {
                return Ok(None);
            }
            let stream = device.cuda_stream();
            let Some(GraphWeights { held, layers, final_norm, lm_head, eps, inv_freq }) =
                GraphWeights::gather(p, device, &stream, mat)?
            else {
                return Ok(None);
            };
            let Some(layers) = layers.into_iter().map(|l| l.into_llama()).collect::<Option<Vec<Layer>>>() else {
                return Ok(None);
            };
            if final_norm.layer_norm {
                return Ok(None);
            }
            let final_norm = final_norm.weight;
            let inter = layers[0].gate.rows;
            let blas = CudaBlas::new(stream.clone()).map_err(candle_core::Error::wrap)?;
            let workspace = device.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
            // SAFETY: the workspace outlives the handle (field order) and is used by nothing else.
            unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    slice_ptr(&workspace, &stream) as *mut std::ffi::c_void,
                    WORKSPACE_BYTES,
                )
                .result()
                .map_err(candle_core::Error::wrap)?;
            }
            let sms = stream
                .context()
                .attribute(
                    candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(candle_core::Error::wrap)? as usize;
            // Load every kernel now: loading a module while the stream captures is not allowed.
            let mut funcs = HashMap::new();
            let mma_attention = hd <= 128 && !std::env::var(MMA_ATTENTION_ENV).is_ok_and(|v| v == "0");
            let attention =
                if mma_attention { format!("attention_rows_mma_{hd}") } else { format!("attention_rows_{hd}") };
            let names = ["hidden_from_bf16", "rms_rows", "swiglu_rows", "attention_rows_combine"];
            for n in names.iter().copied().chain([attention.as_str()]) {
                let f = device.get_or_load_custom_func(n, MODULE, PTX)?.into_cuda_function();
                funcs.insert(n.to_string(), f);
            }
            Ok(Some(Self {
                device: device.clone(),
                stream,
                blas,
                _workspace: workspace,
                _held: held,
                layers,
                final_norm,
                lm_head,
                hidden: cfg.hidden_size,
                inter,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                vocab: lm_head.rows,
                eps: eps as f32,
                interleaved: p.interleaved,
                inv_freq,
                funcs,
                sms,
                mma_attention,
                graphs: vec![],
            }))
        }

        fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
            let f = self.funcs.get(name).ok_or_else(|| candle_core::Error::Msg(format!("batch graph: no {name}")))?;
            launch(&self.stream, f, false, grid, block, 0, args)
        }

        /// Attention splits per (row, KV group) for a batch: enough blocks to fill the card about four times
        /// over (sixteen one-warp blocks per SM for the tensor-core kernel), each split at least four tiles of
        /// the cache's columns.
        fn splits(&self, rows: usize, capacity: usize) -> usize {
            let blocks = rows * self.kv_heads;
            let per_sm = if self.mma_attention { 16 } else { 4 };
            let for_the_card = (self.sms * per_sm).div_ceil(blocks.max(1));
            for_the_card.min(capacity.div_ceil(4 * ATT_TILE)).clamp(1, MAX_SPLITS)
        }

        /// `y[rows, w.rows] (+)= x[rows, w.cols] · wᵀ` (row strides `ldx`, `ldy`; y f32 or bf16), f32 accumulate.
        /// cuBLAS is column-major: this is `yᵀ = wᵀᵀ · xᵀ` with the weight as a transposed operand.
        #[allow(clippy::too_many_arguments)]
        fn gemm(
            &self,
            w: &Mat,
            x: u64,
            ldx: usize,
            rows: usize,
            y: u64,
            ldy: usize,
            y_f32: bool,
            add: bool,
        ) -> Result<()> {
            use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
            let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
            // SAFETY: every pointer is a live device buffer of the stated shape (weights held by the model and
            // this engine, activations by the captured graph's buffers); the scalars are host f32 values.
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    w.rows as i32,
                    rows as i32,
                    w.cols as i32,
                    &alpha as *const f32 as *const std::ffi::c_void,
                    w.ptr as *const std::ffi::c_void,
                    CUDA_R_16BF,
                    w.cols as i32,
                    x as *const std::ffi::c_void,
                    CUDA_R_16BF,
                    ldx as i32,
                    &beta as *const f32 as *const std::ffi::c_void,
                    y as *mut std::ffi::c_void,
                    if y_f32 { CUDA_R_32F } else { CUDA_R_16BF },
                    ldy as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(candle_core::Error::wrap)
        }

        fn buffers(&self, rows: usize, splits: usize) -> Result<Buffers> {
            let d = &self.device;
            let (h, hd, nh, nkv) = (self.hidden, self.head_dim, self.heads, self.kv_heads);
            Ok(Buffers {
                embedded: d.alloc_zeros::<bf16>(rows * h)?,
                residual: d.alloc_zeros::<f32>(rows * h)?,
                normed: d.alloc_zeros::<bf16>(rows * h)?,
                qkv: d.alloc_zeros::<bf16>(rows * (nh + 2 * nkv) * hd)?,
                attn: d.alloc_zeros::<bf16>(rows * nh * hd)?,
                gate_up: d.alloc_zeros::<bf16>(rows * 2 * self.inter)?,
                act: d.alloc_zeros::<bf16>(rows * self.inter)?,
                logits: d.alloc_zeros::<f32>(rows * self.vocab)?,
                lens: d.alloc_zeros::<i32>(rows + 1)?,
                partials: d.alloc_zeros::<f32>(if splits > 1 { rows * nh * splits * (hd + 2) } else { 1 })?,
            })
        }

        /// Record the whole step on the stream (captured by the caller). `key` is [rows, capacity, then every
        /// layer's key and value buffer addresses].
        fn record(&self, key: &[u64], b: &Buffers, splits: usize) -> Result<()> {
            use Arg::{F, I, P};
            let (rows, capacity) = (key[0] as usize, key[1] as usize);
            let s = &*self.stream;
            let (h, hd, nh, nkv, inter) = (self.hidden, self.head_dim, self.heads, self.kv_heads, self.inter);
            let (residual, normed, qkv) = (slice_ptr(&b.residual, s), slice_ptr(&b.normed, s), slice_ptr(&b.qkv, s));
            let (attn, gate_up, act) = (slice_ptr(&b.attn, s), slice_ptr(&b.gate_up, s), slice_ptr(&b.act, s));
            let (lens, inv_freq) = (slice_ptr(&b.lens, s), slice_ptr(&self.inv_freq, s));
            let r = rows as u32;
            let n = (rows * h) as u32;
            self.launch(
                "hidden_from_bf16",
                (n.div_ceil(256), 1, 1),
                256,
                &[P(slice_ptr(&b.embedded, s)), P(residual), I(n as i32)],
            )?;
            let norm = |w: u64| {
                self.launch("rms_rows", (r, 1, 1), 256, &[P(residual), P(w), F(self.eps), P(normed), I(h as i32)])
            };
            let qkv_width = (nh + 2 * nkv) * hd;
            let q_scale = F(1.0 / (hd as f32).sqrt());
            // Tensor cores: one warp per (row, group, split). CUDA cores: one warp per query head of a group, and
            // enough threads to stage a tile of keys and values.
            let (att, att_threads) = if self.mma_attention {
                (format!("attention_rows_mma_{hd}"), 32)
            } else {
                (format!("attention_rows_{hd}"), 32 * (nh / nkv).max(hd / 32).max(4) as u32)
            };
            for (i, l) in self.layers.iter().enumerate() {
                let (kc, vc) = (key[2 + 2 * i], key[3 + 2 * i]);
                norm(l.attn_norm)?;
                // q, k, v side by side in each row of `qkv`: one GEMM where the weights are too.
                match joined(&[l.q, l.k, l.v]) {
                    Some(m) => self.gemm(&m, normed, h, rows, qkv, qkv_width, false, false)?,
                    None => {
                        self.gemm(&l.q, normed, h, rows, qkv, qkv_width, false, false)?;
                        self.gemm(&l.k, normed, h, rows, qkv + (nh * hd * 2) as u64, qkv_width, false, false)?;
                        let v_at = qkv + ((nh + nkv) * hd * 2) as u64;
                        self.gemm(&l.v, normed, h, rows, v_at, qkv_width, false, false)?;
                    }
                }
                let args = [P(qkv), P(lens), P(kc), P(vc), I(capacity as i32), I(nh as i32), I(nkv as i32)];
                let partials = slice_ptr(&b.partials, s);
                let args =
                    [&args[..], &[P(inv_freq), q_scale, I(self.interleaved as i32), P(attn), P(partials)]].concat();
                self.launch(&att, (nkv as u32, r, splits as u32), att_threads, &args)?;
                if splits > 1 {
                    let args = [P(partials), P(attn), I(nh as i32), I(splits as i32), I(hd as i32)];
                    self.launch("attention_rows_combine", (nh as u32, r, 1), hd as u32, &args)?;
                }
                self.gemm(&l.o, attn, nh * hd, rows, residual, h, true, true)?;
                norm(l.mlp_norm)?;
                match joined(&[l.gate, l.up]) {
                    Some(m) => self.gemm(&m, normed, h, rows, gate_up, 2 * inter, false, false)?,
                    None => {
                        self.gemm(&l.gate, normed, h, rows, gate_up, 2 * inter, false, false)?;
                        self.gemm(&l.up, normed, h, rows, gate_up + (inter * 2) as u64, 2 * inter, false, false)?;
                    }
                }
                let total = (rows * inter) as u32;
                self.launch(
                    "swiglu_rows",
                    (total.div_ceil(256), 1, 1),
                    256,
                    &[P(gate_up), P(act), I(inter as i32), I(total as i32)],
                )?;
                self.gemm(&l.down, act, inter, rows, residual, h, true, true)?;
            }
            norm(self.final_norm)?;
            self.gemm(&self.lm_head, normed, h, rows, slice_ptr(&b.logits, s), self.vocab, true, false)
        }

        fn capture(&self, key: Vec<u64>) -> Result<Captured> {
            let (rows, capacity) = (key[0] as usize, key[1] as usize);
            let splits = self.splits(rows, capacity);
            let bufs = self.buffers(rows, splits)?;
            let s = &self.stream;
            s.begin_capture(candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(candle_core::Error::wrap)?;
            let recorded = self.record(&key, &bufs, splits);
            let graph = s
                .end_capture(candle_core::cuda_backend::cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .map_err(candle_core::Error::wrap)?;
            recorded?;
            let graph = graph.ok_or_else(|| candle_core::Error::Msg("batch graph: empty capture".into()))?;
            graph.upload().map_err(candle_core::Error::wrap)?;
            Ok(Captured { key, graph, rows, bufs })
        }

        fn run_step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
            let rows = embedded.dim(0)?;
            let len = cache.len();
            // The batch's buffers exist from its prefill; this only grows them if the step needs a column.
            let (k0, _) =
                cache.layer_buffers(0).ok_or_else(|| candle_core::Error::Msg("batch graph: empty cache".into()))?;
            if k0.dim(0)? != rows || k0.dtype() != DType::BF16 {
                candle_core::bail!("batch graph: cache of {:?} {:?} for {rows} rows", k0.dims(), k0.dtype());
            }
            cache.reserve(1, self.kv_heads, self.head_dim, DType::BF16, embedded.device())?;
            let s = self.stream.clone();
            let capacity = cache.layer_buffers(0).expect("reserved").0.dim(2)?;
            let mut key = vec![rows as u64, capacity as u64];
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
            let g = &self.graphs[idx];
            let mut lens = Vec::with_capacity(rows + 1);
            lens.push(len as i32);
            let starts = cache.starts();
            lens.extend((0..rows).map(|r| starts.get(r).copied().unwrap_or(0) as i32));
            let emb = embedded.flatten_all()?.contiguous()?;
            let emb_ptr = storage_ptr(&emb, &s)?;
            // SAFETY: both destinations are this graph's own buffers of these sizes; the host source is copied
            // before the call returns (pageable memory); `emb` is freed in stream order, after the copy.
            unsafe {
                result::memcpy_htod_async(slice_ptr(&g.bufs.lens, &s), &lens, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
                result::memcpy_dtod_async(
                    slice_ptr(&g.bufs.embedded, &s),
                    emb_ptr,
                    rows * self.hidden * 2,
                    s.cu_stream(),
                )
                .map_err(candle_core::Error::wrap)?;
            }
            g.graph.launch().map_err(candle_core::Error::wrap)?;
            cache.advance(1);
            let n = g.rows * self.vocab;
            // The logits buffer is overwritten by the next replay: hand out a copy.
            // SAFETY: `out` is fully written by the copy below before anything reads it (same stream).
            let out = unsafe { self.device.alloc::<f32>(n)? };
            // SAFETY: `n` f32 values from the graph's logits buffer into `out`, in stream order.
            unsafe {
                result::memcpy_dtod_async(slice_ptr(&out, &s), slice_ptr(&g.bufs.logits, &s), n * 4, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
            }
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
            Ok(Tensor::from_storage(storage, (rows, 1, self.vocab), BackpropOp::none(), false))
        }
    }
}

/// The graph against the regular forward pass on the GPU (`cargo test --features cuda` where a GPU is
/// present): each row's logits at every decoded step equal those of one prefill over that row's whole
/// sequence alone (which never takes a graph), within bf16's rounding.
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use crate::load::{load, DeviceSpec, LoadOptions};
    use candle_core::{DType, Tensor};

    #[test]
    fn batch_graph_steps_match_the_regular_forward_pass() {
        if !candle_core::utils::cuda_is_available() || candle_core::Device::new_cuda(0).is_err() {
            eprintln!("skipping: no CUDA device");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Head dims 64 and 128; 2, 8 and 1 query heads per KV group.
        let llama = crate::model::Architecture::Llama;
        let layouts = [(llama, 256, 4, 2), (llama, 512, 8, 1), (llama, 512, 4, 4)];
        // Both attention kernels: tensor cores (the default) and CUDA cores. (Another test running meanwhile
        // may pick up the switch: both kernels are correct.)
        for ((arch, hidden, heads, kv_heads), cuda_cores) in layouts.iter().flat_map(|l| [(*l, false), (*l, true)]) {
            if cuda_cores {
                std::env::set_var(crate::ops::fused::MMA_ATTENTION_ENV, "0");
            }
            let mut config = crate::testing::tiny_config(arch, 512);
            config["hidden_size"] = hidden.into();
            config["num_attention_heads"] = heads.into();
            config["num_key_value_heads"] = kv_heads.into();
            config["intermediate_size"] = 768.into();
            let path = dir.path().join(format!("bf16-{hidden}-{heads}-{kv_heads}-{cuda_cores}"));
            crate::testing::write_hf_model(&path, &config, 17).unwrap();
            let opts =
                LoadOptions { device: Some(DeviceSpec::Cuda(0)), dtype: Some(DType::BF16), ..Default::default() };
            let m = load(path.to_str().unwrap(), &opts).unwrap().model;
            // Five rows of different lengths, one of them long enough to span several attention rounds.
            let prompts: Vec<Vec<u32>> = [3usize, 40, 1, 17, 90]
                .iter()
                .enumerate()
                .map(|(r, &n)| (0..n).map(|i| ((i * 37 + r * 11) % 500 + 3) as u32).collect())
                .collect();
            let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
            let mut cache = m.new_cache();
            let mut seqs = prompts.clone();
            let first = m.prefill_rows(&refs, &mut cache).unwrap();
            let mut next = first.argmax(1).unwrap().to_vec1::<u32>().unwrap();
            let mut steps = vec![];
            for _ in 0..12 {
                for (s, &t) in seqs.iter_mut().zip(&next) {
                    s.push(t);
                }
                let ids = Tensor::from_vec(next.clone(), (next.len(), 1), m.device()).unwrap();
                let logits = m.forward_last(&ids, &mut cache).unwrap(); // the graph
                next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
                steps.push(logits);
            }
            let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            for (r, seq) in seqs.iter().enumerate() {
                let graph =
                    Tensor::cat(&steps.iter().map(|s| s.narrow(0, r, 1).unwrap()).collect::<Vec<_>>(), 0).unwrap();
                let all = m.forward(&m.input(seq).unwrap(), &mut m.new_cache()).unwrap();
                let reference = all.squeeze(0).unwrap().narrow(0, prompts[r].len(), 12).unwrap();
                let rel = rms(&(&graph - &reference).unwrap()) / rms(&reference);
                eprintln!("{hidden}/{heads}/{kv_heads} cuda cores {cuda_cores} row {r}: batch graph vs one prefill, relative RMS difference of 12 steps' logits {rel:.4}");
                assert!(rel < 0.05, "row {r}: batch graph logits differ from the regular forward pass by {rel}");
            }
            std::env::remove_var(crate::ops::fused::MMA_ATTENTION_ENV);
        }
    }
}

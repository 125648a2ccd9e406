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
//! A pass of several new tokens per row (prefill, MMLU scoring, a speculative verification) runs through the
//! same kernels and GEMMs over every token, launched as it goes rather than captured (its shapes change from
//! pass to pass): rotary, the head split and the KV write as one kernel, attention as the span kernel (shared
//! prefix, then each row's own columns), and the last layer's MLP, final norm and head only at the positions
//! asked for. Through candle's ops the same pass spent a third of its GPU time in strided copies, residual adds
//! and separate norm / rotary kernels (TinyLlama shapes on an H100: pp512 94k → 150k tokens/s, a full MMLU
//! 34.0 → 19.9 s).
//!
//! Quantized weights (`--quantize`, GGUF blocks) take the same path: before each GEMM its matrices are
//! dequantized to bf16 into one scratch buffer (the head in slices of it), so the GEMMs run on tensor cores
//! over the dequantized model's weights. Through candle's ops a pass over quantized weights runs integer
//! kernels over 8-bit activations and a batch's decode step is ~470 launches; dequantizing the whole model
//! costs about what reading it as bf16 once does.
//!
//! Used for one new token per row, inference ops, on CUDA, bf16 or quantized weights, bf16 activations, llama-shaped layers
//! (RMSNorm, SwiGLU, full rotary) without bias or adapters, no shared prefix, head dim 64, 128 or 256. Anything
//! else takes the regular forward pass, which stays the reference.

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
    use crate::model::decode_graph::imp::{capture_graph, graph_device, logits_copy, GraphWeights, LlamaLayer};
    use crate::model::decode_graph::{GraphEngine, GraphParts};
    use crate::model::linear::{Linear, LinearWeight};
    use crate::ops::fused::cuda::kernel;
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

    /// Head dims of the span attention kernel (a pass of several tokens per row).
    const SPAN_HEAD_DIMS: [usize; 2] = [64, 128];

    /// A weight matrix `[rows, cols]` (row-major): bf16 read in place by the GEMMs, or quantized blocks
    /// dequantized before each product.
    #[derive(Clone, Copy)]
    struct Mat {
        ptr: u64,
        rows: usize,
        cols: usize,
        quantized: Option<Quantized>,
    }

    /// How a quantized matrix becomes bf16: its dequantization kernel and the bytes of one row's blocks.
    #[derive(Clone, Copy)]
    struct Quantized {
        kernel: &'static str,
        row_bytes: usize,
    }

    impl Mat {
        fn dense(ptr: u64, rows: usize, cols: usize) -> Self {
            Mat { ptr, rows, cols, quantized: None }
        }

        fn elems(&self) -> usize {
            self.rows * self.cols
        }
    }

    /// The matrices as one, if each is bf16 and directly follows the previous in memory
    /// (`Linear::place_side_by_side`).
    fn joined(mats: &[Mat]) -> Option<Mat> {
        let first = *mats.first()?;
        let mut end = first.ptr;
        for m in mats {
            if m.ptr != end || m.cols != first.cols || m.quantized.is_some() {
                return None;
            }
            end += (m.rows * m.cols * 2) as u64;
        }
        Some(Mat::dense(first.ptr, mats.iter().map(|m| m.rows).sum(), first.cols))
    }

    /// Elements of the scratch buffer that holds dequantized weights: the largest launch's quantized matrices
    /// (q/k/v, o, gate/up, down) and at least 32 Mi of a quantized head's (dequantized in slices of rows).
    const HEAD_SLICE_ELEMS: usize = 32 << 20;

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

    /// The most rows of a product our small-GEMM kernel takes (two tiles of 8 input rows); more go to cuBLAS.
    const SMALL_GEMM_ROWS: usize = 16;

    /// Passes of at most this many tokens (rows × new tokens: a speculative verification, a short prompt) are
    /// captured as CUDA graphs once their shape repeats: launched op by op, their ~10 launches a layer cost more
    /// than their kernels' own time.
    const CAPTURED_PASS_TOKENS: usize = 16;
    /// Captured passes kept per model (one per shape: each k + 1 of an adaptive speculation, each cache size).
    const MAX_PASS_GRAPHS: usize = 8;

    /// The shape of a pass: rows, new tokens per row, positions whose logits it returns, cache columns, prefix.
    struct PassShape {
        rows: usize,
        t: usize,
        tail: usize,
        cap: usize,
        prefix: usize,
    }

    /// A pass's activations (`packed`: the last layer's residual and attention rows at the `tail` positions).
    struct PassBuffers {
        residual: CudaSlice<f32>,
        normed: CudaSlice<bf16>,
        qkv: CudaSlice<bf16>,
        q: CudaSlice<bf16>,
        attn: CudaSlice<bf16>,
        gate_up: CudaSlice<bf16>,
        act: CudaSlice<bf16>,
        logits: CudaSlice<f32>,
        packed: Option<(CudaSlice<f32>, CudaSlice<bf16>)>,
    }

    /// A small pass as a graph: `key` = its shape, then the prefix's and the cache's buffers by layer (the
    /// graph reads and writes them); `input` and `pos` are written before each replay.
    struct CapturedPass {
        key: Vec<u64>,
        graph: CudaGraph,
        bufs: PassBuffers,
        input: CudaSlice<bf16>,
        pos: CudaSlice<u32>,
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
        /// Dequantized weights of the launch at hand (quantized models only; the stream orders its reuse).
        scratch: Option<CudaSlice<bf16>>,
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
        /// Products of at most [`SMALL_GEMM_ROWS`] rows through our kernel rather than cuBLAS.
        small_gemm: bool,
        graphs: Vec<Captured>,
        passes: Vec<CapturedPass>,
        /// Keys of small passes run once, uncaptured: the next pass of the same shape is captured.
        pass_shapes_seen: Vec<Vec<u64>>,
        /// Whether small passes are captured (tests compare them with passes launched as they go).
        capture_passes: bool,
    }

    /// The weight as the GEMMs read it, or `None` if this linear layer needs the regular path.
    fn mat(l: &Linear, stream: &CudaStream) -> Result<Option<Mat>> {
        if l.bias().is_some() || l.lora().is_some() {
            return Ok(None);
        }
        let (rows, cols) = (l.out_features(), l.in_features());
        Ok(match l.weight() {
            LinearWeight::Dense(w) if w.dtype() == DType::BF16 && w.is_contiguous() => {
                Some(Mat::dense(storage_ptr(w, stream)?, rows, cols))
            }
            LinearWeight::Quantized(q) if q.device().is_cuda() => {
                let Some(kernel) = crate::ops::fused::cuda::dequantize_bf16_kernel(q.dtype()) else {
                    return Ok(None);
                };
                let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
                Some(Mat { ptr: q.device_ptr()? as u64, rows, cols, quantized: Some(Quantized { kernel, row_bytes }) })
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

        fn pass(&mut self, embedded: &Tensor, cache: &mut KvCache, tail: usize) -> Result<Option<Tensor>> {
            self.prefill(embedded, cache, tail)
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
            // Quantized weights: a scratch buffer for the largest launch's dequantized matrices.
            let quantized_elems =
                |ms: &[Mat]| -> usize { ms.iter().filter(|m| m.quantized.is_some()).map(Mat::elems).sum() };
            let mut scratch_elems: usize = layers
                .iter()
                .flat_map(|l| [&[l.q, l.k, l.v][..], &[l.o], &[l.gate, l.up], &[l.down]].map(quantized_elems))
                .max()
                .unwrap_or(0);
            // The dequantization kernels the weights need (none for a bf16 model).
            let mut dequantizers: Vec<&str> = layers
                .iter()
                .flat_map(|l| [l.q, l.k, l.v, l.o, l.gate, l.up, l.down])
                .chain([lm_head])
                .filter_map(|m| m.quantized.map(|q| q.kernel))
                .collect();
            dequantizers.sort_unstable();
            dequantizers.dedup();
            if lm_head.quantized.is_some() {
                scratch_elems = scratch_elems.max(lm_head.elems().min(HEAD_SLICE_ELEMS)).max(lm_head.cols);
            }
            let scratch = if dequantizers.is_empty() {
                None
            } else {
                // SAFETY: every element a GEMM reads is written by a dequantization kernel before it.
                Some(unsafe { device.alloc::<bf16>(scratch_elems)? })
            };
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
            let small_gemm = !std::env::var(crate::ops::fused::SMALL_GEMM_ENV).is_ok_and(|v| v == "0");
            let names = ["hidden_from_bf16", "rms_rows", "swiglu_rows", "attention_rows_combine"];
            let small = ["small_gemm_bf16_1", "small_gemm_bf16_2"];
            let pass = ["rope_qkv_rows", "gather_tail_rows", "swiglu_rows8"];
            let span = format!("span_attention_mma_{hd}");
            let span = (mma_attention && SPAN_HEAD_DIMS.contains(&hd)).then_some(span.as_str());
            for n in names
                .iter()
                .copied()
                .chain([attention.as_str()])
                .chain(pass)
                .chain(span)
                .chain(dequantizers)
                .chain(small)
            {
                let f = kernel(device, n)?;
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
                scratch,
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
                small_gemm,
                graphs: vec![],
                passes: vec![],
                pass_shapes_seen: vec![],
                capture_passes: true,
            }))
        }

        /// Small passes captured as graphs so far (tests).
        #[cfg(test)]
        pub fn captured_passes(&self) -> usize {
            self.passes.len()
        }

        /// Capture small passes (the default) or launch every pass as it goes (tests compare the two).
        #[cfg(test)]
        pub fn set_capture_passes(&mut self, on: bool) {
            self.capture_passes = on;
        }

        fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
            let f = self.funcs.get(name).ok_or_else(|| candle_core::Error::Msg(format!("batch graph: no {name}")))?;
            launch(&self.stream, f, false, grid, block, 0, args)
        }

        /// `y = x · [m_1 | m_2 | …]ᵀ` for `rows` rows of `x` (bf16 out, the matrices' outputs side by side in each
        /// row of `y`): one GEMM where the matrices lie back to back in memory, else one per matrix into its
        /// columns.
        fn gemm_side_by_side(&self, mats: &[Mat], x: u64, rows: usize, y: u64) -> Result<()> {
            let mats = &self.dequantized(mats)?;
            let width: usize = mats.iter().map(|m| m.rows).sum();
            let ldx = mats[0].cols;
            if let Some(m) = joined(mats) {
                return self.gemm(&m, x, ldx, rows, y, width, false, false);
            }
            let mut at = 0;
            for m in mats {
                self.gemm(m, x, ldx, rows, y + (at * 2) as u64, width, false, false)?;
                at += m.rows;
            }
            Ok(())
        }

        /// The matrices as bf16 the GEMMs read: quantized ones dequantized back to back into the scratch buffer
        /// (so q/k/v and gate/up stay one GEMM), bf16 ones as they are. The scratch is reused by the next
        /// launch's matrices: the stream runs this GEMM before their dequantization.
        fn dequantized(&self, mats: &[Mat]) -> Result<Vec<Mat>> {
            let mut at = 0;
            mats.iter()
                .map(|m| {
                    if m.quantized.is_none() {
                        return Ok(*m);
                    }
                    let dst = self.scratch_ptr()? + (at * 2) as u64;
                    at += m.elems();
                    self.dequantize(m, 0, m.rows, dst)?;
                    Ok(Mat::dense(dst, m.rows, m.cols))
                })
                .collect()
        }

        fn scratch_ptr(&self) -> Result<u64> {
            let scratch =
                self.scratch.as_ref().ok_or_else(|| candle_core::Error::Msg("batch graph: no scratch".into()))?;
            Ok(slice_ptr(scratch, &self.stream))
        }

        /// Rows `[first, first + rows)` of a quantized matrix as bf16 at `dst`.
        fn dequantize(&self, m: &Mat, first: usize, rows: usize, dst: u64) -> Result<()> {
            let q = m.quantized.ok_or_else(|| candle_core::Error::Msg("batch graph: not quantized".into()))?;
            let groups = rows * m.cols / 32;
            let src = m.ptr + (first * q.row_bytes) as u64;
            let grid = crate::ops::fused::cuda::dequantize_grid(groups);
            self.launch(q.kernel, grid, 256, &[Arg::P(src), Arg::P(dst), Arg::P(groups as u64)])
        }

        /// `y = x · wᵀ` (f32 out, row stride `ldy`) for one matrix, dequantized first if it is quantized: the
        /// head, whose bf16 form may be large, in slices of rows the scratch buffer holds.
        #[allow(clippy::too_many_arguments)]
        fn gemm_any(&self, w: &Mat, x: u64, ldx: usize, rows: usize, y: u64, ldy: usize, add: bool) -> Result<()> {
            if w.quantized.is_none() {
                return self.gemm(w, x, ldx, rows, y, ldy, true, add);
            }
            let scratch_elems = self.scratch.as_ref().map_or(0, |s| s.len());
            let slice = (scratch_elems / w.cols).min(w.rows).max(1);
            let dst = self.scratch_ptr()?;
            let mut first = 0;
            while first < w.rows {
                let n = slice.min(w.rows - first);
                self.dequantize(w, first, n, dst)?;
                let part = Mat::dense(dst, n, w.cols);
                self.gemm(&part, x, ldx, rows, y + (first * 4) as u64, ldy, true, add)?;
                first += n;
            }
            Ok(())
        }

        /// `act = silu(gate) · up` for `rows` rows of `gate_up` (`[rows, 2 · inter]`, gate then up).
        fn swiglu(&self, gate_up: u64, act: u64, rows: usize) -> Result<()> {
            use Arg::{I, P};
            let (name, per_thread) =
                if self.inter.is_multiple_of(8) { ("swiglu_rows8", 8) } else { ("swiglu_rows", 1) };
            let threads = (rows * self.inter / per_thread) as u32;
            let args = [P(gate_up), P(act), I(self.inter as i32), I(threads as i32)];
            self.launch(name, (threads.div_ceil(256), 1, 1), 256, &args)
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
            if w.quantized.is_some() {
                candle_core::bail!("batch graph: a GEMM over quantized blocks (dequantize them first)");
            }
            if self.small_gemm
                && rows <= SMALL_GEMM_ROWS
                && w.cols.is_multiple_of(64)
                && ldx.is_multiple_of(8)
                && x.is_multiple_of(16)
            {
                use Arg::{I, P};
                let mode = match (y_f32, add) {
                    (true, false) => Some(0),
                    (true, true) => Some(1),
                    (false, false) => Some(2),
                    (false, true) => None,
                };
                if let Some(mode) = mode {
                    let name = if rows <= 8 { "small_gemm_bf16_1" } else { "small_gemm_bf16_2" };
                    let (n, k) = (w.rows as i32, w.cols as i32);
                    let args =
                        [P(w.ptr), I(n), I(k), P(x), I(ldx as i32), I(rows as i32), P(y), I(ldy as i32), I(mode)];
                    return self.launch(name, (w.rows.div_ceil(16) as u32, 1, 1), 256, &args);
                }
            }
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
                self.gemm_side_by_side(&[l.q, l.k, l.v], normed, rows, qkv)?;
                let args = [P(qkv), P(lens), P(kc), P(vc), I(capacity as i32), I(nh as i32), I(nkv as i32)];
                let partials = slice_ptr(&b.partials, s);
                let args =
                    [&args[..], &[P(inv_freq), q_scale, I(self.interleaved as i32), P(attn), P(partials)]].concat();
                self.launch(&att, (nkv as u32, r, splits as u32), att_threads, &args)?;
                if splits > 1 {
                    let args = [P(partials), P(attn), I(nh as i32), I(splits as i32), I(hd as i32)];
                    self.launch("attention_rows_combine", (nh as u32, r, 1), hd as u32, &args)?;
                }
                self.gemm_any(&l.o, attn, nh * hd, rows, residual, h, true)?;
                norm(l.mlp_norm)?;
                self.gemm_side_by_side(&[l.gate, l.up], normed, rows, gate_up)?;
                self.swiglu(gate_up, act, rows)?;
                self.gemm_any(&l.down, act, inter, rows, residual, h, true)?;
            }
            norm(self.final_norm)?;
            self.gemm_any(&self.lm_head, normed, h, rows, slice_ptr(&b.logits, s), self.vocab, false)
        }

        fn capture(&self, key: Vec<u64>) -> Result<Captured> {
            let (rows, capacity) = (key[0] as usize, key[1] as usize);
            let splits = self.splits(rows, capacity);
            let bufs = self.buffers(rows, splits)?;
            let graph = capture_graph(&self.stream, "batch graph", || self.record(&key, &bufs, splits))?;
            Ok(Captured { key, graph, rows, bufs })
        }

        /// One pass of `t` new tokens per row (prefill, MMLU scoring, a speculative verification): the step's
        /// kernels and GEMMs over all `rows · t` tokens, with rotary, the head split and the KV write as one
        /// kernel and attention as one tensor-core kernel over the shared prefix and each row's span; the final
        /// norm and head only for the last `tail` positions of each row. Returns their logits `[rows, tail,
        /// vocab]` (f32), or `None` where the pass does not apply (head dim 256, attention on CUDA cores, a cache
        /// of another shape or type) and the regular forward pass runs instead. Small passes whose shape repeats
        /// replay a captured graph (`captured_pass`); the rest are launched as they go.
        fn prefill(&mut self, embedded: &Tensor, cache: &mut KvCache, tail: usize) -> Result<Option<Tensor>> {
            let (rows, t, _) = embedded.dims3()?;
            let (nkv, hd) = (self.kv_heads, self.head_dim);
            if !self.mma_attention || !SPAN_HEAD_DIMS.contains(&hd) || tail == 0 || tail > t {
                return Ok(None);
            }
            if let Some((k0, _)) = cache.layer_buffers(0) {
                if k0.dim(0)? != rows || k0.dtype() != DType::BF16 {
                    return Ok(None);
                }
            }
            if !cache.starts().is_empty() && cache.starts().len() != rows {
                return Ok(None);
            }
            let s = self.stream.clone();
            let prefix = cache.prefix().cloned();
            let p = prefix.as_ref().map_or(0, |p| p.len());
            // Every layer's buffers the pass reads or writes outside its own: the cache's keys and values, the
            // prefix's (contiguous bf16, as `share_prefix` makes them).
            let mut outside = Vec::with_capacity(4 * self.layers.len());
            for i in 0..self.layers.len() {
                match &prefix {
                    Some(pre) => {
                        let (k, v) =
                            pre.layer(i).ok_or_else(|| candle_core::Error::Msg("prefix layer missing".into()))?;
                        if k.dtype() != DType::BF16 || !k.is_contiguous() || !v.is_contiguous() {
                            return Ok(None);
                        }
                        outside.extend([storage_ptr(k, &s)?, storage_ptr(v, &s)?]);
                    }
                    None => outside.extend([0, 0]),
                }
            }
            let prev = cache.len();
            cache.reserve_rows(rows, t, nkv, hd, DType::BF16, embedded.device())?;
            for i in 0..self.layers.len() {
                let (kb, vb) =
                    cache.layer_buffers(i).ok_or_else(|| candle_core::Error::Msg("cache layer missing".into()))?;
                outside.extend([storage_ptr(kb, &s)?, storage_ptr(vb, &s)?]);
            }
            let cap = cache.layer_buffers(0).expect("reserved").0.dim(2)?;
            let shape = PassShape { rows, t, tail, cap, prefix: p };
            // The cache's length, then each row's first column: read by the kernels from device memory.
            let mut pos = Vec::with_capacity(rows + 1);
            pos.push(prev as u32);
            pos.extend((0..rows).map(|r| cache.starts().get(r).copied().unwrap_or(0) as u32));
            let emb = embedded.contiguous()?;
            let input = storage_ptr(&emb, &s)?;
            let captured = if self.capture_passes && rows * t <= CAPTURED_PASS_TOKENS {
                self.captured_pass(&shape, outside.clone(), input, &pos)?
            } else {
                None
            };
            let logits = match captured {
                Some(logits) => logits,
                None => {
                    let bufs = self.pass_buffers(&shape)?;
                    let pos = s.clone_htod(&pos).map_err(candle_core::Error::wrap)?;
                    self.record_pass(&shape, &outside, input, slice_ptr(&pos, &s), &bufs)?;
                    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(bufs.logits, self.device.clone()));
                    Tensor::from_storage(storage, (rows, tail, self.vocab), BackpropOp::none(), false)
                }
            };
            cache.advance(t);
            Ok(Some(logits))
        }

        /// A small pass through its captured graph, captured on the second pass of its shape (a one-off
        /// prompt is not worth a capture): the input and the positions are copied into the graph's buffers,
        /// the logits out of them. `None`: the shape is new, launch it as it goes.
        fn captured_pass(
            &mut self,
            shape: &PassShape,
            outside: Vec<u64>,
            input: u64,
            pos: &[u32],
        ) -> Result<Option<Tensor>> {
            let mut key: Vec<u64> =
                [shape.rows, shape.t, shape.tail, shape.cap, shape.prefix].map(|v| v as u64).to_vec();
            key.extend(outside);
            let idx = match self.passes.iter().position(|g| g.key == key) {
                Some(i) => i,
                None if self.pass_shapes_seen.contains(&key) => {
                    let g = self.capture_pass(shape, key)?;
                    if self.passes.len() == MAX_PASS_GRAPHS {
                        self.passes.remove(0);
                    }
                    self.passes.push(g);
                    self.passes.len() - 1
                }
                None => {
                    if self.pass_shapes_seen.len() == MAX_PASS_GRAPHS {
                        self.pass_shapes_seen.remove(0);
                    }
                    self.pass_shapes_seen.push(key);
                    return Ok(None);
                }
            };
            let s = self.stream.clone();
            let g = &self.passes[idx];
            // SAFETY: the destinations are this graph's own buffers of these sizes (the host source is copied
            // before the call returns: pageable memory); the input tensor is freed in stream order, after the
            // copy.
            unsafe {
                result::memcpy_htod_async(slice_ptr(&g.pos, &s), pos, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
                let bytes = shape.rows * shape.t * self.hidden * 2;
                result::memcpy_dtod_async(slice_ptr(&g.input, &s), input, bytes, s.cu_stream())
                    .map_err(candle_core::Error::wrap)?;
            }
            g.graph.launch().map_err(candle_core::Error::wrap)?;
            let logits =
                logits_copy(&self.device, &s, slice_ptr(&g.bufs.logits, &s), (shape.rows, shape.tail, self.vocab))?;
            Ok(Some(logits))
        }

        fn capture_pass(&self, shape: &PassShape, key: Vec<u64>) -> Result<CapturedPass> {
            let bufs = self.pass_buffers(shape)?;
            let input = self.device.alloc_zeros::<bf16>(shape.rows * shape.t * self.hidden)?;
            let pos = self.device.alloc_zeros::<u32>(shape.rows + 1)?;
            let s = &self.stream;
            let (input_ptr, pos_ptr) = (slice_ptr(&input, s), slice_ptr(&pos, s));
            let graph =
                capture_graph(s, "batch graph pass", || self.record_pass(shape, &key[5..], input_ptr, pos_ptr, &bufs))?;
            Ok(CapturedPass { key, graph, bufs, input, pos })
        }

        fn pass_buffers(&self, shape: &PassShape) -> Result<PassBuffers> {
            let d = &self.device;
            let (h, hd, nh, nkv, inter) = (self.hidden, self.head_dim, self.heads, self.kv_heads, self.inter);
            let n = shape.rows * shape.t;
            let selected = shape.rows * shape.tail;
            // SAFETY (all): every element is written by a kernel or GEMM before it is read.
            unsafe {
                Ok(PassBuffers {
                    residual: d.alloc::<f32>(n * h)?,
                    normed: d.alloc::<bf16>(n * h)?,
                    qkv: d.alloc::<bf16>(n * (nh + 2 * nkv) * hd)?,
                    q: d.alloc::<bf16>(n * nh * hd)?,
                    attn: d.alloc::<bf16>(n * nh * hd)?,
                    gate_up: d.alloc::<bf16>(n * 2 * inter)?,
                    act: d.alloc::<bf16>(n * inter)?,
                    logits: d.alloc::<f32>(selected * self.vocab)?,
                    packed: if shape.tail < shape.t {
                        Some((d.alloc::<f32>(selected * h)?, d.alloc::<bf16>(selected * nh * hd)?))
                    } else {
                        None
                    },
                })
            }
        }

        /// Launch a pass on the stream (captured or not). `outside` holds every layer's prefix key and value
        /// buffers (0 without a prefix), then every layer's cache key and value buffers; `input` the embedded
        /// tokens `[rows · t, hidden]` (bf16); `pos` the cache's length, then each row's first column (u32).
        fn record_pass(&self, shape: &PassShape, outside: &[u64], input: u64, pos: u64, b: &PassBuffers) -> Result<()> {
            use Arg::{F, I, P};
            let &PassShape { rows, t, tail, cap, prefix: p } = shape;
            let (h, hd, nh, nkv, inter) = (self.hidden, self.head_dim, self.heads, self.kv_heads, self.inter);
            let s = &*self.stream;
            let n = rows * t;
            let layers = self.layers.len();
            let (residual, normed) = (slice_ptr(&b.residual, s), slice_ptr(&b.normed, s));
            let (qkv, q, attn) = (slice_ptr(&b.qkv, s), slice_ptr(&b.q, s), slice_ptr(&b.attn, s));
            let (gate_up, act) = (slice_ptr(&b.gate_up, s), slice_ptr(&b.act, s));
            let (prev_at, starts) = (pos, pos + 4);
            let inv_freq = slice_ptr(&self.inv_freq, s);
            let span = format!("span_attention_mma_{hd}");
            let (span_heads, span_queries, span_threads) = crate::ops::fused::span_attention_blocks(nh, nkv);
            let elems = (n * h) as u32;
            self.launch(
                "hidden_from_bf16",
                (elems.div_ceil(256), 1, 1),
                256,
                &[P(input), P(residual), I(elems as i32)],
            )?;
            let norm = |w: u64, x: u64, n: usize| {
                self.launch("rms_rows", (n as u32, 1, 1), 256, &[P(x), P(w), F(self.eps), P(normed), I(h as i32)])
            };
            // The last layer's output is needed only at the `tail` positions: after its attention (every key and
            // value is cached) the rest of it runs on those rows alone, packed.
            let selected = rows * tail;
            let last = layers - 1;
            for (i, l) in self.layers.iter().enumerate() {
                let (kp, vp) = (outside[2 * i], outside[2 * i + 1]);
                let (kc, vc) = (outside[2 * (layers + i)], outside[2 * (layers + i) + 1]);
                norm(l.attn_norm, residual, n)?;
                self.gemm_side_by_side(&[l.q, l.k, l.v], normed, n, qkv)?;
                // The cache's length (0 here) is read from `prev_at`, so a captured pass serves every length.
                let geometry = [I(t as i32), I(0), I(cap as i32), I(p as i32), I(nh as i32), I(nkv as i32)];
                let rope = [P(qkv), P(starts), P(inv_freq), P(q), P(kc), P(vc)];
                let rope_tail = [I(hd as i32), F(1.0 / (hd as f32).sqrt()), I(self.interleaved as i32), P(prev_at)];
                self.launch(
                    "rope_qkv_rows",
                    (t as u32, rows as u32, 1),
                    128,
                    &[&rope[..], &geometry, &rope_tail].concat(),
                )?;
                let att = [P(q), P(kc), P(vc), P(kp), P(vp), P(starts), P(attn)];
                let grid = (t.div_ceil(span_queries) as u32, (nh / span_heads) as u32, rows as u32);
                let att_tail = [I(span_heads as i32), P(prev_at)];
                self.launch(&span, grid, span_threads, &[&att[..], &geometry, &att_tail].concat())?;
                let (mut x, mut a, mut m) = (residual, attn, n);
                if let (true, Some((res_tail, attn_tail))) = (i == last, &b.packed) {
                    let (res_tail, attn_tail) = (slice_ptr(res_tail, s), slice_ptr(attn_tail, s));
                    for (src, dst, words) in [(residual, res_tail, h), (attn, attn_tail, nh * hd / 2)] {
                        let args = [P(src), P(dst), I(words as i32), I(t as i32), I(tail as i32)];
                        self.launch("gather_tail_rows", (selected as u32, 1, 1), 256, &args)?;
                    }
                    (x, a, m) = (res_tail, attn_tail, selected);
                }
                self.gemm_any(&l.o, a, nh * hd, m, x, h, true)?;
                norm(l.mlp_norm, x, m)?;
                self.gemm_side_by_side(&[l.gate, l.up], normed, m, gate_up)?;
                self.swiglu(gate_up, act, m)?;
                self.gemm_any(&l.down, act, inter, m, x, h, true)?;
                if i == last {
                    norm(self.final_norm, x, m)?;
                }
            }
            self.gemm_any(&self.lm_head, normed, h, selected, slice_ptr(&b.logits, s), self.vocab, false)
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
            logits_copy(&self.device, &s, slice_ptr(&g.bufs.logits, &s), (g.rows, 1, self.vocab))
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

    /// config.json of a tiny llama of `hidden` wide with `heads` query and `kv_heads` key/value heads (head dim
    /// hidden / heads), an MLP 768 wide and a vocabulary of 512.
    fn llama_config(hidden: usize, heads: usize, kv_heads: usize) -> serde_json::Value {
        let mut config = crate::testing::tiny_config(crate::model::Architecture::Llama, 512);
        config["hidden_size"] = hidden.into();
        config["num_attention_heads"] = heads.into();
        config["num_key_value_heads"] = kv_heads.into();
        config["intermediate_size"] = 768.into();
        config
    }

    /// A random llama of this layout written to `path`, loaded twice: bf16 on the GPU and the f32 reference on
    /// the CPU.
    fn gpu_and_f32_models(
        path: &std::path::Path,
        (hidden, heads, kv_heads): (usize, usize, usize),
        seed: u64,
    ) -> (crate::model::Model, crate::model::Model) {
        crate::testing::write_hf_model(path, &llama_config(hidden, heads, kv_heads), seed).unwrap();
        let on = |device, dtype| LoadOptions { device: Some(device), dtype: Some(dtype), ..Default::default() };
        let path = path.to_str().unwrap();
        (
            load(path, &on(DeviceSpec::Cuda(0), DType::BF16)).unwrap().model,
            load(path, &on(DeviceSpec::Cpu, DType::F32)).unwrap().model,
        )
    }

    /// Root mean square of a tensor's values.
    fn rms(t: &Tensor) -> f32 {
        t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn batch_graph_steps_match_the_regular_forward_pass() {
        if crate::testing::cuda_device().is_none() {
            return;
        }
        let _env = crate::testing::gpu_env_lock();
        let dir = tempfile::tempdir().unwrap();
        // Head dims 64 and 128; 2, 8 and 1 query heads per KV group.
        let layouts = [(256, 4, 2), (512, 8, 1), (512, 4, 4)];
        // Both attention kernels: tensor cores (the default) and CUDA cores (the environment switch, read when an
        // engine is built; `gpu_env_lock` keeps the tests that need the default out of the way meanwhile).
        for ((hidden, heads, kv_heads), cuda_cores) in layouts.iter().flat_map(|l| [(*l, false), (*l, true)]) {
            if cuda_cores {
                std::env::set_var(crate::ops::fused::MMA_ATTENTION_ENV, "0");
            }
            let config = llama_config(hidden, heads, kv_heads);
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

    /// A case of [`passes_match_the_f32_path`]: the GPU model's logits.
    type Run = Box<dyn Fn(&crate::model::Model) -> Tensor>;

    /// Passes of several tokens per row through the batched step's kernels (`Engine::prefill`) against the f32
    /// path on the CPU, beside the regular GPU path's distance from it: one prompt (every position), a later
    /// pass over a filled cache (the last 3 positions), rows of different lengths (left padding) and rows after
    /// a shared prefix (MMLU's passes). Head dims 64 and 128; 2, 8 and 1 query heads per KV group.
    #[test]
    fn passes_match_the_f32_path() {
        if crate::testing::cuda_device().is_none() {
            return;
        }
        let _env = crate::testing::gpu_env_lock();
        let cpu_dev = candle_core::Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        for (hidden, heads, kv_heads) in [(256, 4, 2), (512, 8, 1), (512, 4, 4)] {
            let path = dir.path().join(format!("pass-{hidden}-{heads}-{kv_heads}"));
            let (m, cpu) = gpu_and_f32_models(&path, (hidden, heads, kv_heads), 23);
            let seq =
                |n: usize, r: usize| -> Vec<u32> { (0..n).map(|i| ((i * 37 + r * 11) % 500 + 3) as u32).collect() };
            // Each case: the logits of the GPU model (`[rows, positions, vocab]`) and the f32 reference's.
            let cases: Vec<(&str, Run, Tensor)> = {
                let whole = seq(97, 0);
                let f32_all = cpu.forward(&cpu.input(&whole).unwrap(), &mut cpu.new_cache()).unwrap();
                let prompts: Vec<Vec<u32>> =
                    [3usize, 40, 1, 17, 90].iter().enumerate().map(|(r, &n)| seq(n, r + 1)).collect();
                let f32_rows = |pre: &[u32]| {
                    let rows: Vec<Tensor> = prompts
                        .iter()
                        .map(|p| {
                            let ids: Vec<u32> = pre.iter().chain(p).copied().collect();
                            cpu.forward_last(&cpu.input(&ids).unwrap(), &mut cpu.new_cache()).unwrap()
                        })
                        .collect();
                    Tensor::cat(&rows, 0).unwrap().unsqueeze(1).unwrap()
                };
                let prefix = seq(33, 9);
                let (p1, p2) = (prompts.clone(), prompts.clone());
                let (w1, w2, pre) = (whole.clone(), whole.clone(), prefix.clone());
                vec![
                    (
                        "one prompt, every position",
                        Box::new(move |m: &crate::model::Model| {
                            m.forward(&m.input(&w1[..90]).unwrap(), &mut m.new_cache()).unwrap()
                        }),
                        f32_all.narrow(1, 0, 90).unwrap(),
                    ),
                    (
                        "a later pass, last 3 positions",
                        Box::new(move |m: &crate::model::Model| {
                            let mut cache = m.new_cache();
                            m.forward_last(&m.input(&w2[..90]).unwrap(), &mut cache).unwrap();
                            m.forward_tail(&m.input(&w2[90..]).unwrap(), &mut cache, 3).unwrap()
                        }),
                        f32_all.narrow(1, 94, 3).unwrap(),
                    ),
                    (
                        "rows of different lengths",
                        Box::new(move |m: &crate::model::Model| {
                            let refs: Vec<&[u32]> = p1.iter().map(|p| p.as_slice()).collect();
                            m.prefill_rows(&refs, &mut m.new_cache()).unwrap().unsqueeze(1).unwrap()
                        }),
                        f32_rows(&[]),
                    ),
                    (
                        "rows after a shared prefix",
                        Box::new(move |m: &crate::model::Model| {
                            let mut primed = m.new_cache();
                            m.forward_last(&m.input(&pre).unwrap(), &mut primed).unwrap();
                            let shared = std::sync::Arc::new(primed.share_prefix(pre.len()).unwrap());
                            let mut cache = m.new_cache();
                            cache.set_prefix(shared).unwrap();
                            let refs: Vec<&[u32]> = p2.iter().map(|p| p.as_slice()).collect();
                            m.prefill_rows(&refs, &mut cache).unwrap().unsqueeze(1).unwrap()
                        }),
                        f32_rows(&prefix),
                    ),
                ]
            };
            for (name, run, reference) in cases {
                let rel = |on: bool| {
                    m.set_cuda_pass(on);
                    let got = run(&m).to_device(&cpu_dev).unwrap();
                    assert_eq!(got.dims(), reference.dims(), "{name}: shape");
                    rms(&(&got - &reference).unwrap()) / rms(&reference)
                };
                let (ours, regular) = (rel(true), rel(false));
                m.set_cuda_pass(true);
                eprintln!(
                    "{hidden}/{heads}/{kv_heads} {name}: relative RMS difference from the f32 path: pass {ours:.4}, \
                     regular GPU path {regular:.4}"
                );
                // bf16 activations cost ~1-3%; no more than the regular GPU path's own rounding.
                let bound = 0.03f32.max(1.1 * regular);
                assert!(ours < bound, "{name}: pass logits differ from the f32 path by {ours} (> {bound})");
            }
            assert!(m.batch_graph.is_built(), "the pass engine was not built");
        }
    }

    /// The small-GEMM kernel (products of at most 16 rows) against f32 products of the same bf16 values on the
    /// CPU: row counts that leave a tile part empty, a weight whose rows do not fill the last block, a reduction
    /// its warps split unevenly, an input row stride wider than the reduction, and each epilogue (f32 store,
    /// f32 add, bf16 store).
    #[test]
    fn small_gemm_matches_the_cpu_product() {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let Some(device) = crate::testing::cuda_device() else { return };
        let candle_core::Device::Cuda(dev) = &device else { unreachable!() };
        let stream = dev.cuda_stream();
        let (n, k, ldx) = (100usize, 576usize, 584usize);
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 0.5).collect()
        };
        let cpu = candle_core::Device::Cpu;
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let wd = w.to_device(&device).unwrap();
        for rows in [1usize, 5, 8, 9, 16] {
            let x = Tensor::from_vec(values(rows * ldx, rows + 2), (rows, ldx), &cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let x32 = x.to_dtype(DType::F32).unwrap().narrow(1, 0, k).unwrap();
            let product = x32.matmul(&w32.t().unwrap()).unwrap();
            let xd = x.to_device(&device).unwrap();
            let start = Tensor::from_vec(values(rows * n, rows + 9), (rows, n), &cpu).unwrap();
            let name = if rows <= 8 { "small_gemm_bf16_1" } else { "small_gemm_bf16_2" };
            let f = crate::ops::fused::cuda::kernel(dev, name).unwrap();
            for mode in 0..3 {
                let (y, expected) = match mode {
                    0 => (Tensor::zeros((rows, n), DType::F32, &device).unwrap(), product.clone()),
                    1 => (start.to_device(&device).unwrap(), (&product + &start).unwrap()),
                    _ => (Tensor::zeros((rows, n), DType::BF16, &device).unwrap(), product.clone()),
                };
                let args = [
                    Arg::P(storage_ptr(&wd, &stream).unwrap()),
                    Arg::I(n as i32),
                    Arg::I(k as i32),
                    Arg::P(storage_ptr(&xd, &stream).unwrap()),
                    Arg::I(ldx as i32),
                    Arg::I(rows as i32),
                    Arg::P(storage_ptr(&y, &stream).unwrap()),
                    Arg::I(n as i32),
                    Arg::I(mode),
                ];
                launch(&stream, &f, false, (n.div_ceil(16) as u32, 1, 1), 256, 0, &args).unwrap();
                let got = y.to_dtype(DType::F32).unwrap().to_device(&cpu).unwrap();
                let diff = (&got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                // f32 sums in another order; bf16 output rounds to 8 bits of mantissa.
                let bound = if mode == 2 { scale / 128.0 } else { 1e-4 * scale };
                assert!(diff <= bound, "{rows} rows, mode {mode}: max |difference| {diff} (> {bound})");
            }
        }
    }

    /// Small passes of one shape, as speculative decoding makes them (k + 1 new tokens, the logits of each,
    /// a rollback of the rejected ones before the next): the first is launched as it goes, the second captured
    /// as a graph, the rest replay it. The replays equal the same passes launched as they go (the same kernels
    /// on the same values), and each pass is about as far from the f32 path on the CPU as the regular GPU
    /// path. Head dims 64 and 128.
    #[test]
    fn small_passes_replay_their_graph() {
        if crate::testing::cuda_device().is_none() {
            return;
        }
        let _env = crate::testing::gpu_env_lock();
        let cpu_dev = candle_core::Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        for (hidden, heads, kv_heads) in [(256, 4, 2), (512, 4, 4)] {
            let path = dir.path().join(format!("verify-{hidden}-{heads}-{kv_heads}"));
            let (m, cpu) = gpu_and_f32_models(&path, (hidden, heads, kv_heads), 29);
            let ids: Vec<u32> = (0..90).map(|i| ((i * 41 + 7) % 500 + 3) as u32).collect();
            let f32_all = cpu.forward(&cpu.input(&ids).unwrap(), &mut cpu.new_cache()).unwrap();
            // (where the pass starts, tokens kept of it before the next): 5 new tokens each.
            let passes = [(40usize, 5usize), (45, 2), (47, 5), (52, 0), (52, 3), (55, 5)];
            // `capture`: None takes the regular path; Some(on) the engine, its small passes captured or not.
            let run = |capture: Option<bool>| -> Vec<Tensor> {
                m.set_cuda_pass(capture.is_some());
                let mut cache = m.new_cache();
                m.forward_last(&m.input(&ids[..40]).unwrap(), &mut cache).unwrap();
                if let Some(on) = capture {
                    m.batch_graph.built_mut(|e| e.set_capture_passes(on)).expect("the pass engine is built");
                }
                passes
                    .iter()
                    .map(|&(at, keep)| {
                        let logits = m.forward_tail(&m.input(&ids[at..at + 5]).unwrap(), &mut cache, 5).unwrap();
                        cache.truncate(at + keep);
                        logits.to_device(&cpu_dev).unwrap()
                    })
                    .collect()
            };
            let (launched, captured, regular) = (run(Some(false)), run(Some(true)), run(None));
            m.set_cuda_pass(true);
            for (i, &(at, _)) in passes.iter().enumerate() {
                let same = (&captured[i] - &launched[i]).unwrap().abs().unwrap().max_all().unwrap();
                let same = same.to_scalar::<f32>().unwrap();
                assert_eq!(same, 0.0, "pass {i}: the captured pass differs from the launched one by {same}");
                let reference = f32_all.narrow(1, at, 5).unwrap();
                let rel = |got: &Tensor| rms(&(got - &reference).unwrap()) / rms(&reference);
                let (d_ours, d_regular) = (rel(&captured[i]), rel(&regular[i]));
                eprintln!(
                    "{hidden}/{heads}/{kv_heads} pass {i} at {at}: relative RMS difference from the f32 path: \
                     {d_ours:.4}, regular GPU path {d_regular:.4}"
                );
                // bf16 rounding of random weights costs 2-4% either way; a wrong position or a stale input is ~100%.
                let bound = 0.04f32.max(1.2 * d_regular);
                assert!(d_ours < bound, "pass {i}: logits differ from the f32 path by {d_ours} (> {bound})");
            }
            let captured = m.batch_graph.built(|e| e.captured_passes());
            assert_eq!(captured, Some(1), "one shape, one captured pass");
        }
    }

    /// Passes over quantized weights (every GGUF type with a dequantization kernel) against the same passes
    /// over the file's weights dequantized at load: equal within bf16 rounding (the GEMMs read the same bf16
    /// values), and no farther from the f32 path on the CPU than the regular GPU path (candle's products over
    /// 8-bit activations). One prompt (every position), a later pass (its last 3 positions), rows of
    /// different lengths and six decode steps of that batch (the captured step graph).
    #[test]
    fn quantized_passes_equal_the_dequantized_model() {
        if crate::testing::cuda_device().is_none() {
            return;
        }
        let _env = crate::testing::gpu_env_lock();
        let cpu_dev = candle_core::Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let config = llama_config(256, 4, 2);
        let seq = |n: usize, r: usize| -> Vec<u32> { (0..n).map(|i| ((i * 37 + r * 11) % 500 + 3) as u32).collect() };
        let whole = seq(97, 0);
        let prompts: Vec<Vec<u32>> = [3usize, 40, 1, 17, 90].iter().enumerate().map(|(r, &n)| seq(n, r + 1)).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let cases = |m: &crate::model::Model| -> Vec<Tensor> {
            let all = m.forward(&m.input(&whole[..90]).unwrap(), &mut m.new_cache()).unwrap();
            let mut cache = m.new_cache();
            m.forward_last(&m.input(&whole[..90]).unwrap(), &mut cache).unwrap();
            let later = m.forward_tail(&m.input(&whole[90..]).unwrap(), &mut cache, 3).unwrap();
            // Rows of different lengths, then six decode steps of the batch (the same tokens for every model).
            let mut cache = m.new_cache();
            let mut rows = vec![m.prefill_rows(&refs, &mut cache).unwrap()];
            for step in 0..6u32 {
                let next: Vec<u32> = (0..refs.len() as u32).map(|r| (r * 53 + step * 29) % 500 + 3).collect();
                let ids = Tensor::from_vec(next, (refs.len(), 1), m.device()).unwrap();
                rows.push(m.forward_last(&ids, &mut cache).unwrap());
            }
            let rows = Tensor::stack(&rows, 1).unwrap();
            [all, later, rows].map(|t| t.to_device(&cpu_dev).unwrap().to_dtype(DType::F32).unwrap()).to_vec()
        };
        let names =
            ["one prompt, every position", "a later pass, last 3 positions", "rows of different lengths, 6 steps"];
        for (dtype, _) in crate::ops::fused::cuda::DEQUANTIZE_BF16_KERNELS {
            let path = dir.path().join(format!("{dtype:?}.gguf"));
            crate::testing::write_llama_gguf(&path, &config, 29, dtype).unwrap();
            let on = |device, dtype, dequantize| LoadOptions {
                device: Some(device),
                dtype: Some(dtype),
                dequantize,
                ..Default::default()
            };
            let path = path.to_str().unwrap();
            let quantized = load(path, &on(DeviceSpec::Cuda(0), DType::BF16, false)).unwrap().model;
            let dense = load(path, &on(DeviceSpec::Cuda(0), DType::BF16, true)).unwrap().model;
            let f32_model = load(path, &on(DeviceSpec::Cpu, DType::F32, true)).unwrap().model;
            let (ours, dequantized, reference) = (cases(&quantized), cases(&dense), cases(&f32_model));
            quantized.set_cuda_pass(false);
            let regular = cases(&quantized);
            quantized.set_cuda_pass(true);
            assert!(quantized.batch_graph.is_built(), "{dtype:?}: the pass engine was not built");
            for (i, name) in names.iter().enumerate() {
                let same = rms(&(&ours[i] - &dequantized[i]).unwrap()) / rms(&dequantized[i]);
                let from_f32 = rms(&(&ours[i] - &reference[i]).unwrap()) / rms(&reference[i]);
                let regular_from_f32 = rms(&(&regular[i] - &reference[i]).unwrap()) / rms(&reference[i]);
                eprintln!(
                    "{dtype:?} {name}: relative RMS difference from the dequantized model's pass {same:.5}; from \
                     the f32 path: pass {from_f32:.4}, regular GPU path {regular_from_f32:.4}"
                );
                assert!(same < 0.005, "{dtype:?} {name}: differs from the dequantized model's pass by {same}");
                let bound = 0.03f32.max(1.1 * regular_from_f32);
                assert!(from_f32 < bound, "{dtype:?} {name}: differs from the f32 path by {from_f32} (> {bound})");
            }
        }
    }
}

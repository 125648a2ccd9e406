//! The one linear-layer seam every architecture goes through: dense or quantized weights, an optional bias,
//! and room for an adapter (LoRA) on top. Architectures never touch weight storage directly.

use crate::ops::cpu::{self, gemm, PackedMatrix, WeightKind};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Result, Storage, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// From this many input rows on, a CPU product over quantized or half-precision weights takes the f32 GEMM
/// over dequantized tiles (`ops::cpu::gemm`) while [`ExactScoring`] is held, and where that GEMM is the
/// faster path (see `Linear::tiles_beat_kernels`).
const DEQUANT_GEMM_ROWS: usize = 16;

thread_local! {
    /// Holders of [`TrainingProducts`] on this thread.
    static TRAINING_PRODUCTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// While one is held on a thread, frozen products there are training's (`Linear::frozen_training_value`: the
/// dequantized model's) also where the input tracks no gradient — the first layer's projections of the
/// embeddings, and under activation checkpointing every layer's first pass — so that a training loss is the
/// loss of one model (the inference kernels' 8-bit activations moved a SmolLM2 Q4_1 loss by 1%). Held by the
/// model's passes with the differentiable ops; per thread, as each data-parallel rank is a thread.
pub struct TrainingProducts(());

impl TrainingProducts {
    pub fn hold() -> Self {
        TRAINING_PRODUCTS.with(|n| n.set(n.get() + 1));
        Self(())
    }

    fn active() -> bool {
        TRAINING_PRODUCTS.with(|n| n.get() > 0)
    }
}

impl Drop for TrainingProducts {
    fn drop(&mut self) {
        TRAINING_PRODUCTS.with(|n| n.set(n.get() - 1));
    }
}

/// Holders of [`ExactScoring`].
static EXACT_SCORING: AtomicUsize = AtomicUsize::new(0);

/// While one is held, CPU passes of many rows over quantized or half-precision weights take the exact
/// product of the dequantized weight (see `Linear::dequantized_product`) instead of the 8-bit-activation
/// kernels, so that a row's scores do not depend on how many rows share its pass: log-likelihood scoring
/// (MMLU) holds one. Generation does not: its prefill runs whichever path is faster for the weight's type. `BILLION_CPU_EXACT_PREFILL=1` holds
/// it for the whole process.
pub struct ExactScoring(());

impl ExactScoring {
    pub fn hold() -> Self {
        EXACT_SCORING.fetch_add(1, Ordering::SeqCst);
        Self(())
    }

    fn active() -> bool {
        static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        EXACT_SCORING.load(Ordering::SeqCst) > 0
            || *ENV.get_or_init(|| std::env::var("BILLION_CPU_EXACT_PREFILL").is_ok_and(|v| v == "1"))
    }
}

impl Drop for ExactScoring {
    fn drop(&mut self) {
        EXACT_SCORING.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]`, in the model's compute dtype.
    Dense(Tensor),
    /// GGUF blocks (Q4_0 … Q8_0, K-quants); activations go through f32.
    Quantized(Arc<QTensor>),
    /// GGUF blocks of the 32-wide types regrouped for our CPU kernels (see `ops::cpu::packed`); the only
    /// copy of those weights on the CPU.
    Packed(Arc<PackedMatrix>),
}

/// A low-rank adapter added to a frozen base: `y += scale * B(A(dropout(x)))`.
/// `a` is `[rank, in]`, `b` is `[out, rank]`; the adapter computes in `a`'s dtype (f32 while training).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout probability on the adapter's input; non-zero only while training.
    pub dropout: f32,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    qmatmul: Option<QMatMul>,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self { weight: LinearWeight::Dense(weight), qmatmul: None, bias, lora: None, out_features, in_features })
    }

    /// Packed for our kernels on the CPU where the type has a packed layout.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        if let Some(p) = Self::pack(&weight)? {
            return Self::packed(Arc::new(p), bias);
        }
        let qmatmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            weight: LinearWeight::Quantized(weight),
            qmatmul: Some(qmatmul),
            bias,
            lora: None,
            out_features,
            in_features,
        })
    }

    /// The 8-row packed layout of a quantized CPU weight, where its type has one.
    pub fn pack(q: &QTensor) -> Result<Option<PackedMatrix>> {
        let (rows, cols) = q.shape().dims2()?;
        match WeightKind::from_ggml(q.dtype()) {
            Some(kind) if q.device().is_cpu() && PackedMatrix::packs(kind) && cpu::supports(kind, cols) => {
                Ok(Some(PackedMatrix::pack(kind, &q.data()?, rows, cols)))
            }
            _ => Ok(None),
        }
    }

    pub fn packed(weight: Arc<PackedMatrix>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = (weight.rows(), weight.cols());
        Ok(Self { weight: LinearWeight::Packed(weight), qmatmul: None, bias, lora: None, out_features, in_features })
    }

    /// Quantizes a dense `[out, in]` weight to `dtype` (rows must be a multiple of the block size).
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, dtype: GgmlDType) -> Result<Self> {
        let device = weight.device().clone();
        let w32 = weight.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
        let q = QTensor::quantize_onto(&w32, dtype, &device)?;
        Self::quantized(Arc::new(q), bias)
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) {
        self.lora = lora;
    }

    /// Put these layers' dense weights (same input width, dtype and device) side by side in one buffer, each
    /// layer keeping a view of its own rows, so that a step over many rows can multiply them as one matrix (the
    /// batched decode graph does: q, k, v in one GEMM). Layers that are not all dense are left as they are.
    pub fn place_side_by_side(layers: &mut [&mut Linear]) -> Result<()> {
        let dense: Vec<&Tensor> = layers
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeight::Dense(w) => Some(w),
                LinearWeight::Quantized(_) | LinearWeight::Packed(_) => None,
            })
            .collect();
        if dense.len() != layers.len() || dense.len() < 2 {
            return Ok(());
        }
        let joined = Tensor::cat(&dense, 0)?;
        let mut row = 0;
        for l in layers.iter_mut() {
            l.weight = LinearWeight::Dense(joined.narrow(0, row, l.out_features)?);
            row += l.out_features;
        }
        Ok(())
    }

    /// The weight as a dense tensor of `dtype` (dequantizing if needed).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(dtype),
            LinearWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            LinearWeight::Packed(p) => Self::dequantized_packed(p)?.to_dtype(dtype),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
            LinearWeight::Packed(p) => p.bytes(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_) | LinearWeight::Packed(_))
    }

    fn dequantized_packed(p: &PackedMatrix) -> Result<Tensor> {
        Tensor::from_vec(p.dequantize(), (p.rows(), p.cols()), &candle_core::Device::Cpu)
    }
}

impl Linear {
    /// `x Wᵀ` in f32 with the weight dequantized for this product (on the CPU tile by tile, inside our GEMM;
    /// elsewhere as a whole). Scoring passes of many rows take this path
    /// on the CPU rather than the 8-bit-activation kernels: a row's scores must not depend on how many rows
    /// share its pass, and 8-bit activation rounding is sensitive enough on real models (activation
    /// outliers make a block's step coarse) that last-bit differences between batch shapes move a
    /// log-likelihood by up to 0.1 on SmolLM2.
    fn dequantized_product(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features;
        let n = self.out_features;
        // On the CPU each weight tile is dequantized just before it is used (no f32 copy of the matrix).
        let tiled = with_cpu_weights(&self.weight, x, |w, xs| {
            let mut y = vec![0f32; rows * n];
            gemm::matmul_wt(w, xs, rows, &mut y);
            y
        })?;
        if let Some(y) = tiled {
            return Tensor::from_vec(y, self.out_dims(x), x.device())?.to_dtype(x.dtype());
        }
        let w = match &self.weight {
            LinearWeight::Quantized(q) => q.dequantize(x.device())?,
            LinearWeight::Packed(p) => Self::dequantized_packed(p)?,
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
        };
        let dtype = x.dtype();
        x.to_dtype(DType::F32)?
            .reshape((rows, self.in_features))?
            .matmul(&w.t()?)?
            .reshape(self.out_dims(x))?
            .to_dtype(dtype)
    }

    /// Inference as for a pass of many rows even when `x` has few: on the CPU a quantized or half-precision
    /// weight then takes the f32 product of its dequantized tiles, like the layers of that pass did (the LM
    /// head at the last positions of a prefill, so a row's logits do not depend on how many rows the pass
    /// selected).
    pub fn forward_as_many_rows(&self, x: &Tensor) -> Result<Tensor> {
        if self.tiled_on_cpu(x) && self.lora.is_none() && !x.track_op() {
            return self.with_bias(self.dequantized_product(x)?);
        }
        self.forward(x)
    }

    /// Is this a CPU product whose weight our kernels read as stored (quantized, or half precision kept as
    /// such)?
    fn tiled_on_cpu(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && match &self.weight {
                LinearWeight::Quantized(_) | LinearWeight::Packed(_) => true,
                LinearWeight::Dense(w) => w.dtype() != x.dtype() && WeightKind::from_dtype(w.dtype()).is_some(),
            }
    }

    /// Do many rows multiply faster as the f32 GEMM over dequantized tiles than through the 8-bit-activation
    /// (or half) kernels? Measured with `cargo bench --bench cpu_kernels` (2-core AVX2, 256 rows, SmolLM2's
    /// shapes): Q8_0 140–174 GFLOP/s against 134–172 GOP/s — but 208–325 GOP/s with VNNI —, f16 150–170
    /// against 135–157, K-quants (whose prefill kernels are slow) always; the 4- and 5-bit 32-wide types stay
    /// on their kernels (190–300 GOP/s).
    fn tiles_beat_kernels(&self) -> bool {
        match &self.weight {
            LinearWeight::Packed(p) => p.kind() == WeightKind::Q8_0 && !cpu::fast_integer_products(),
            LinearWeight::Quantized(_) | LinearWeight::Dense(_) => true,
        }
    }

    /// Does a pass of `rows` rows multiply a stored CPU weight as f32 tiles rather than through the kernels?
    /// Many rows while scoring, and wherever the tiles are faster.
    fn tiles_for(&self, rows: usize) -> bool {
        Self::many_rows(rows) || rows >= DEQUANT_GEMM_ROWS && self.tiles_beat_kernels()
    }

    /// Does a pass of `rows` rows take the many-rows path (see [`Linear::forward_as_many_rows`])? Only while
    /// [`ExactScoring`] is held.
    pub fn many_rows(rows: usize) -> bool {
        rows >= DEQUANT_GEMM_ROWS && ExactScoring::active()
    }

    /// `x Wᵀ` through our CPU kernels, when the weight is of a type they take (quantized blocks as stored, or
    /// half precision kept as such) and `x` is on the CPU; `None` otherwise.
    fn cpu_kernel_product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if matches!(&self.weight, LinearWeight::Dense(w) if w.dtype() == x.dtype()) {
            return Ok(None);
        }
        let rows = x.elem_count() / self.in_features;
        let product = with_cpu_weights(&self.weight, x, |w, xs| {
            let mut y = vec![0f32; rows * self.out_features];
            kernel_product(w, xs, &mut y);
            y
        })?;
        product.map(|y| Tensor::from_vec(y, self.out_dims(x), x.device())?.to_dtype(x.dtype())).transpose()
    }

    /// Does [`Linear::cpu_rows_product`] take this weight (stored blocks, packed groups, halves, or dense f32,
    /// on the CPU)?
    pub fn cpu_rows_take(&self) -> Result<bool> {
        if let Some(dense) = self.dense_f32_on_cpu() {
            return Ok(dense.dims().len() == 2);
        }
        Ok(with_stored_weights(&self.weight, |_| ())?.is_some())
    }

    /// `y = x Wᵀ` for the `n` f32 rows of `x`, straight into `y` (no bias, no adapter), by the path a pass of
    /// `path_rows` rows of [`Linear::forward`] takes on the CPU: the tiled f32 GEMM or the 8-bit (half)
    /// kernels, as `base_product` picks them. Dense f32 weights go through our GEMM (our f32 matrix-vector loop for one
    /// row) where the regular pass uses candle's. False, with `y` untouched, where the weight is not one of
    /// these.
    pub fn cpu_rows_product(&self, x: &[f32], n: usize, path_rows: usize, y: &mut [f32]) -> Result<bool> {
        if let Some(w) = self.dense_f32_on_cpu() {
            let (rows, cols) = w.dims2()?;
            let w = w.contiguous()?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(values)) = &*ws else { return Ok(false) };
            let values = &values[wl.start_offset()..wl.start_offset() + rows * cols];
            if n == 1 {
                cpu::gemv_f32(values, rows, cols, x, y);
            } else {
                gemm::matmul_wt(gemm::Weights::F32 { values, rows, cols }, x, n, y);
            }
            return Ok(true);
        }
        let tiles = self.tiles_for(path_rows);
        Ok(with_stored_weights(&self.weight, |w| {
            if tiles {
                gemm::matmul_wt(w, x, n, y)
            } else {
                kernel_product(w, x, y)
            }
        })?
        .is_some())
    }

    /// `x Wᵀ` through the fastest inference path (no gradient tracking).
    fn base_product(&self, x: &Tensor) -> Result<Tensor> {
        // Many rows on the CPU while scoring, and wherever the tiles are faster: the exact product of the
        // dequantized weight (see `dequantized_product`); everything else through our kernels.
        if self.tiled_on_cpu(x) && self.tiles_for(x.elem_count() / self.in_features) {
            return self.dequantized_product(x);
        }
        if let Some(y) = self.cpu_kernel_product(x)? {
            return Ok(y);
        }
        Ok(match (&self.weight, &self.qmatmul) {
            (LinearWeight::Quantized(_), Some(qm)) => {
                let dtype = x.dtype();
                qm.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            (LinearWeight::Dense(w), _) => match x.dims() {
                [b1, b2, _, _] => x.matmul(&w.broadcast_left((*b1, *b2))?.t()?)?,
                [b, _, _] if !x.is_contiguous() => x.matmul(&w.broadcast_left(*b)?.t()?)?,
                // Folding the batch into rows gives one GEMM that reads the weight once (a batched product
                // would read it once per row: a decode step of many rows, one token each).
                [b, t, i] => x.reshape((b * t, *i))?.matmul(&w.t()?)?.reshape((*b, *t, self.out_features))?,
                _ => x.matmul(&w.t()?)?,
            },
            (LinearWeight::Quantized(_), None) => unreachable!("quantized linear always has a QMatMul"),
            (LinearWeight::Packed(_), _) => {
                candle_core::bail!("packed CPU weights multiplied with {:?} input", x.device())
            }
        })
    }

    fn dense_f32_on_cpu(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 && w.device().is_cpu() => Some(w),
            _ => None,
        }
    }
}

/// `f(weights)` with a CPU weight seen as our kernels read it: blocks as stored, packed groups, or halves;
/// `None` for dense f32 weights, weights off the CPU, and rows the kernels cannot take.
fn with_stored_weights<R>(weight: &LinearWeight, f: impl FnOnce(gemm::Weights<'_>) -> R) -> Result<Option<R>> {
    Ok(match weight {
        LinearWeight::Packed(p) => Some(f(gemm::Weights::Packed(p))),
        LinearWeight::Quantized(q) => match WeightKind::from_ggml(q.dtype()) {
            Some(kind) if q.device().is_cpu() => {
                let (rows, cols) = q.shape().dims2()?;
                if !cpu::supports(kind, cols) {
                    return Ok(None);
                }
                let bytes = q.data()?;
                Some(f(gemm::Weights::Rows { kind, bytes: &bytes, rows, cols }))
            }
            _ => None,
        },
        LinearWeight::Dense(w) => {
            let Some(kind) = WeightKind::from_dtype(w.dtype()) else { return Ok(None) };
            let (rows, cols) = w.dims2()?;
            if !cpu::supports(kind, cols) {
                return Ok(None);
            }
            let w = w.contiguous()?;
            let (ws, wl) = w.storage_and_layout();
            let half: &[u16] = match &*ws {
                Storage::Cpu(CpuStorage::F16(v)) => bytemuck_u16(v),
                Storage::Cpu(CpuStorage::BF16(v)) => bytemuck_u16(v),
                _ => return Ok(None),
            };
            let half = &half[wl.start_offset()..wl.start_offset() + w.elem_count()];
            // SAFETY: u16 → bytes of the same memory, twice as many.
            let bytes = unsafe { std::slice::from_raw_parts(half.as_ptr() as *const u8, half.len() * 2) };
            Some(f(gemm::Weights::Rows { kind, bytes, rows, cols }))
        }
    })
}

/// `f(weights, x)` with the weight as [`with_stored_weights`] sees it and `x` as contiguous f32 rows; `None`
/// where that gives none or `x` is not on the CPU.
fn with_cpu_weights<R>(
    weight: &LinearWeight,
    x: &Tensor,
    f: impl FnOnce(gemm::Weights<'_>, &[f32]) -> R,
) -> Result<Option<R>> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(xs)) = &*xs else { return Ok(None) };
    let xs = &xs[xl.start_offset()..xl.start_offset() + x.elem_count()];
    with_stored_weights(weight, |w| f(w, xs))
}

/// `y = x Wᵀ` through the 8-bit-activation (or half) kernels, for the `x.len() / cols` rows of `x`.
fn kernel_product(w: gemm::Weights<'_>, x: &[f32], y: &mut [f32]) {
    match w {
        gemm::Weights::Packed(p) => cpu::matmul_packed(p, x, x.len() / p.cols(), y),
        gemm::Weights::Rows { kind, bytes, rows, cols } => cpu::matmul(kind, bytes, rows, cols, x, x.len() / cols, y),
        gemm::Weights::F32 { .. } => unreachable!("dense f32 weights are never seen as stored"),
    }
}

/// Half-precision values as their bits.
fn bytemuck_u16<T: HalfBits>(v: &[T]) -> &[u16] {
    // SAFETY: `T` is f16 or bf16, both 2-byte plain-old-data with u16's alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

trait HalfBits {}
impl HalfBits for half::f16 {}
impl HalfBits for half::bf16 {}

impl Linear {
    /// A quantized GPU weight dequantized for one training product, in the half-precision activations'
    /// dtype (as QLoRA does: the base stays quantized in memory, each product runs on tensor cores over a
    /// transient copy of one layer's weight). candle's quantized product of many rows runs integer kernels
    /// over 8-bit activations, four times slower in a training step and not the dequantized model's product.
    fn half_weight_for_training(weight: &LinearWeight, x: &Tensor) -> Result<Option<Tensor>> {
        match weight {
            LinearWeight::Quantized(q) if x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16) => {
                #[cfg(feature = "cuda")]
                if x.dtype() == DType::BF16 {
                    if let Some(w) = crate::ops::fused::cuda::dequantize_bf16(q)? {
                        return Ok(Some(w));
                    }
                }
                // Other formats through candle's f16 kernels (dequantized weights are far inside f16's range).
                Ok(Some(q.dequantize_f16(x.device())?.to_dtype(x.dtype())?))
            }
            _ => Ok(None),
        }
    }

    /// `dy · W` for the frozen weight, shaped like `x` (a quantized W is dequantized just for this).
    fn input_grad(weight: &LinearWeight, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let in_f = *x.dims().last().unwrap_or(&0);
        let rows = x.elem_count() / in_f.max(1);
        if let Some(w) = Self::half_weight_for_training(weight, x)? {
            let out_f = w.dim(0)?;
            let grad = g.to_dtype(x.dtype())?.reshape((rows, out_f))?.matmul(&w)?;
            return grad.reshape(x.dims());
        }
        // Quantized or half-precision CPU weights: dequantized tile by tile inside the product.
        if !matches!(weight, LinearWeight::Dense(w) if w.dtype() == x.dtype()) {
            let tiled = with_cpu_weights(weight, g, |w, gs| {
                let mut dx = vec![0f32; rows * in_f];
                gemm::matmul_w(w, gs, rows, &mut dx);
                dx
            })?;
            if let Some(dx) = tiled {
                return Tensor::from_vec(dx, x.dims(), x.device())?.to_dtype(x.dtype());
            }
        }
        let w = match weight {
            // Half-precision weights kept as such on the CPU: widened for this product.
            LinearWeight::Dense(w) if w.device().is_cpu() && w.dtype() != x.dtype() => w.to_dtype(x.dtype())?,
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Quantized(q) => q.dequantize(g.device())?,
            LinearWeight::Packed(p) => Self::dequantized_packed(p)?,
        };
        let out_f = w.dim(0)?;
        let rows = g.elem_count() / out_f;
        let grad = g.to_dtype(w.dtype())?.reshape((rows, out_f))?.matmul(&w)?;
        grad.reshape(x.dims())?.to_dtype(x.dtype())
    }

    /// The frozen base product of training (see `frozen_training_value`) without gradient tracking, for ops
    /// that fuse this layer with what follows it (the LM head with the loss).
    pub fn frozen_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.frozen_training_value(&x.detach())
    }

    /// `dy · W` for the frozen weight, shaped like `x`: the input gradient of [`Linear::frozen_forward`].
    pub fn frozen_input_grad(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        Self::input_grad(&self.weight, x, g)
    }

    /// The base product plus bias, no gradient tracking.
    fn frozen_value(&self, x: &Tensor) -> Result<Tensor> {
        self.with_bias(self.base_product(x)?)
    }

    /// The base product for training: quantized or half-precision CPU weights are widened to f32 and
    /// multiplied with the activations as they are (as QLoRA does), and quantized GPU weights dequantized to
    /// the half-precision activations' dtype for the product (`half_weight_for_training`), not through the
    /// inference kernels' 8-bit activations, so the loss and gradients are those of the dequantized model.
    fn frozen_training_value(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = Self::half_weight_for_training(&self.weight, x)? {
            let rows = x.elem_count() / self.in_features;
            let y = x.reshape((rows, self.in_features))?.matmul(&w.t()?)?;
            return self.with_bias(y.reshape(self.out_dims(x))?);
        }
        let widened = x.device().is_cpu()
            && match &self.weight {
                LinearWeight::Packed(_) => true,
                LinearWeight::Quantized(q) => WeightKind::from_ggml(q.dtype()).is_some(),
                LinearWeight::Dense(w) => w.dtype() != x.dtype(),
            };
        if widened {
            self.with_bias(self.dequantized_product(x)?)
        } else {
            self.frozen_value(x)
        }
    }

    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `residual + self(x)`, the residual stream's update. A frozen layer in training is one graph node of
    /// (x, residual) whose backward is `dx = dy · W`, `d residual = dy`: the layer's own output never outlives
    /// the addition (candle's addition node would hold it, though its backward needs no values).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.lora.is_some() || !(x.track_op() || residual.track_op()) {
            return residual + self.forward(x)?;
        }
        let value = (residual.detach() + self.frozen_training_value(&x.detach())?)?;
        let weight = self.weight.clone();
        crate::ops::autograd::with_backward2(x, residual, value, "frozen-linear-residual", move |[x, _], need, g| {
            let dx = need[0].then(|| Self::input_grad(&weight, x, g)).transpose()?;
            Ok((dx, need[1].then(|| g.clone())))
        })
    }

    /// `residual + self(silu(gate) · up)`, the gated MLP's last product. A frozen layer in training is one
    /// graph node of (gate, up, residual): its backward takes `d act = dy · W` and SwiGLU's gradients from gate
    /// and up, so the activation (`[tokens, intermediate]`, the widest tensor of a layer) is not kept for the
    /// backward pass as the frozen product's input.
    pub fn forward_swiglu_residual(&self, gate: &Tensor, up: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.lora.is_some() || !(gate.track_op() || up.track_op() || residual.track_op()) {
            return self.forward_residual(&crate::ops::autograd::swiglu(gate, up)?, residual);
        }
        let act = crate::ops::fused::swiglu(&gate.detach(), &up.detach())?;
        let value = (residual.detach() + self.frozen_training_value(&act)?)?;
        drop(act);
        let weight = self.weight.clone();
        crate::ops::autograd::with_backward3(
            gate,
            up,
            residual,
            value,
            "frozen-swiglu-residual",
            move |[gate, up, _], need, _, g| {
                let (mut dgate, mut dup) = (None, None);
                if need[0] || need[1] {
                    // The activation has gate's shape and dtype: `input_grad` reads only those from its input.
                    let dact = Self::input_grad(&weight, gate, g)?;
                    let (dg, du) = crate::ops::backward::swiglu_backward(gate, up, &dact)?;
                    (dgate, dup) = (need[0].then_some(dg), need[1].then_some(du));
                }
                Ok((dgate, dup, need[2].then(|| g.clone())))
            },
        )
    }

    /// Training with an adapter: `W x + b + scale · B A (mask ⊙ x / keep)` as one op of (x, A, B). Its graph
    /// node keeps only x (shared with the layer's other projections), A, B, the dropout mask's seed (the mask
    /// is a hash of the seed and the element's index, drawn again where it is needed) and the output; the
    /// backward recomputes the rank-r product instead of storing the dropped input, the adapter's output or
    /// the base output.
    fn forward_lora_training(&self, x: &Tensor, l: &LoraAdapter) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && std::env::var_os(TENSOR_LORA_ENV).is_none()
            && l.b.dtype() == l.a.dtype()
            && crate::ops::fused::cuda::lora_fits(
                x.dtype(),
                l.a.dtype(),
                l.a.dim(0)?,
                (x.elem_count() / self.in_features, self.in_features, self.out_features),
            )
        {
            return self.forward_lora_fused(x, l);
        }
        let (in_f, out_f) = (self.in_features, self.out_features);
        let rows = x.elem_count() / in_f;
        let keep = 1.0 - l.dropout as f64;
        let p = l.dropout;
        let mask = if p > 0.0 { Some(dropout_tape::seed()?) } else { None };
        let cd = l.a.dtype();
        // The inverted-dropout factor 1/keep rides on the scale (fewer element-wise passes).
        let dropped = move |x: &Tensor, mask: &Option<u64>| -> Result<Tensor> {
            let x = match mask {
                Some(seed) => crate::ops::backward::dropout_f32(x, *seed, p)?,
                None => x.clone(),
            };
            x.reshape((rows, in_f))?.to_dtype(cd)
        };
        let scale = if mask.is_some() { l.scale / keep } else { l.scale };
        let xd = dropped(&x.detach(), &mask)?;
        let delta = (xd.matmul(&l.a.detach().t()?)?.matmul(&l.b.detach().t()?)? * scale)?;
        let value =
            (self.frozen_training_value(&x.detach())? + delta.reshape(self.out_dims(x))?.to_dtype(x.dtype())?)?;
        let weight = self.weight.clone();
        crate::ops::autograd::with_backward3(x, &l.a, &l.b, value, "lora-linear", move |[x, a, b], needs, _, g| {
            let g32 = (g.reshape((rows, out_f))?.to_dtype(cd)? * scale)?;
            let xd = dropped(x, &mask)?;
            let gxa = g32.matmul(b)?; // [rows, r]
            let db = needs[2].then(|| g32.t()?.matmul(&xd.matmul(&a.t()?)?)).transpose()?;
            let da = needs[1].then(|| gxa.t()?.matmul(&xd)).transpose()?;
            let dx = if needs[0] {
                let mut lora_dx = gxa.matmul(a)?;
                if let Some(seed) = mask {
                    lora_dx = crate::ops::backward::dropout_f32(&lora_dx, seed, p)?.to_dtype(cd)?;
                }
                let base = Self::input_grad(&weight, x, g)?;
                Some((base + lora_dx.reshape(x.dims())?.to_dtype(x.dtype())?)?)
            } else {
                None
            };
            Ok((dx, da, db))
        })
    }

    /// The same layer through our CUDA kernels (`ops::fused::cuda::lora_forward`): the rank-r products
    /// contract the bf16 activations and gradients directly (f32 accumulation, the mask re-derived from its
    /// seed as they load), the base's output and input gradient take the update in the same pass, and the
    /// graph node keeps the rank-r activations `u` (`[rows, r]` f32) instead of recomputing them.
    #[cfg(feature = "cuda")]
    fn forward_lora_fused(&self, x: &Tensor, l: &LoraAdapter) -> Result<Tensor> {
        use crate::ops::fused::cuda::{lora_backward, lora_forward, LoraMask};
        let (in_f, out_f) = (self.in_features, self.out_features);
        let rows = x.elem_count() / in_f;
        let p = l.dropout;
        let (mask, scale) = if p > 0.0 {
            let mask = LoraMask { seed: dropout_tape::seed()?, threshold: crate::ops::backward::drop_threshold(p) };
            // The inverted-dropout factor 1/keep rides on the scale, as in the composed path.
            (mask, (l.scale / (1.0 - p as f64)) as f32)
        } else {
            (LoraMask::NONE, l.scale as f32)
        };
        let base = self.frozen_training_value(&x.detach())?.reshape((rows, out_f))?;
        let xs = x.detach().reshape((rows, in_f))?;
        let (y, u) = lora_forward(&xs, &base, &l.a.detach(), &l.b.detach(), scale, mask)?;
        let value = y.reshape(self.out_dims(x))?;
        let weight = self.weight.clone();
        crate::ops::autograd::with_backward3(x, &l.a, &l.b, value, "lora-linear", move |[x, a, b], needs, _, g| {
            let dx_base = match needs[0] {
                true => Some(Self::input_grad(&weight, x, g)?.reshape((rows, in_f))?),
                false => None,
            };
            let (xs, gs) = (x.reshape((rows, in_f))?, g.reshape((rows, out_f))?);
            let grads = lora_backward(&xs, &gs, dx_base.as_ref(), a, b, &u, scale, mask, needs[1], needs[2])?;
            Ok((grads.dx.map(|d| d.reshape(x.dims())).transpose()?, grads.da, grads.db))
        })
    }

    fn out_dims(&self, x: &Tensor) -> Vec<usize> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = self.out_features;
        dims
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            if x.track_op() || l.a.track_op() || l.b.track_op() {
                return self.forward_lora_training(x, l);
            }
        }
        let y = if x.track_op() {
            // Training. candle's matmul backward computes the gradient of both operands, so a frozen weight
            // would still get a weight-sized gradient (a full extra GEMM per layer, held until the step ends),
            // and its quantized matmul records no backward at all. The product is `frozen_training_value`
            // instead, with a backward for the input only: `dx = dy · W`, a quantized W dequantized just for
            // that moment, so the base stays quantized in memory (QLoRA).
            let weight = self.weight.clone();
            crate::ops::autograd::with_backward(
                x,
                self.frozen_training_value(&x.detach())?,
                "frozen-linear",
                move |x, _, g| Self::input_grad(&weight, x, g),
            )?
        } else if TrainingProducts::active() {
            self.frozen_training_value(x)?
        } else {
            self.frozen_value(x)?
        };
        match &self.lora {
            Some(l) => {
                // Inference with an unmerged adapter.
                let xa = x.to_dtype(l.a.dtype())?;
                let delta = xa.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
                let dtype = y.dtype();
                y + (delta * l.scale)?.to_dtype(dtype)?
            }
            None => Ok(y),
        }
    }
}

/// Set (to anything) to train adapters on CUDA through the composed tensor ops instead of the fused LoRA
/// kernels: the reference those kernels are tested against.
pub const TENSOR_LORA_ENV: &str = "BILLION_TENSOR_LORA";

/// The adapters' dropout masks, drawn in one pass and handed back in a later pass over the same layer:
/// activation checkpointing recomputes a layer in the backward pass, and the recomputation must drop the
/// inputs the first pass dropped. A mask is a seed (`ops::backward::dropout_f32` hashes it with each element's
/// index), so the tape holds one number per adapter. Per thread (each data-parallel rank is a thread of its
/// own).
pub mod dropout_tape {
    use candle_core::Result;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    /// Seeds to hand out instead of drawing (a replay), and seeds handed out so far (a recording).
    #[derive(Default)]
    struct Tape {
        replay: Option<VecDeque<u64>>,
        kept: Option<Vec<u64>>,
    }

    thread_local! {
        static TAPE: RefCell<Tape> = RefCell::new(Tape::default());
    }

    /// Puts an enclosing recording back when a recording ends (also when it fails); the enclosing one keeps
    /// the seeds too.
    struct EndRecording(Option<Vec<u64>>);

    impl Drop for EndRecording {
        fn drop(&mut self) {
            let mut outer = self.0.take();
            TAPE.with(|t| {
                let mut t = t.borrow_mut();
                if let (Some(outer), Some(inner)) = (&mut outer, &t.kept) {
                    outer.extend(inner.iter().copied());
                }
                t.kept = outer;
            });
        }
    }

    /// Puts an enclosing replay and recording back when a replay ends (also when it fails). A replay records
    /// nothing: what it hands out was recorded already.
    struct EndReplay(Option<VecDeque<u64>>, Option<Vec<u64>>);

    impl Drop for EndReplay {
        fn drop(&mut self) {
            let (replay, kept) = (self.0.take(), self.1.take());
            TAPE.with(|t| {
                let mut t = t.borrow_mut();
                t.replay = replay;
                t.kept = kept;
            });
        }
    }

    /// Run `f`, keeping every dropout seed it uses, in order.
    pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<u64>) {
        let end = EndRecording(TAPE.with(|t| t.borrow_mut().kept.replace(vec![])));
        let out = f();
        let kept = TAPE.with(|t| t.borrow().kept.clone()).unwrap_or_default();
        drop(end);
        (out, kept)
    }

    /// Run `f` with the seeds [`record`] kept for the same computation, in the order they were drawn; it
    /// must use every one.
    pub fn replay<R>(seeds: Vec<u64>, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let end = TAPE.with(|t| {
            let mut t = t.borrow_mut();
            EndReplay(t.replay.replace(seeds.into()), t.kept.take())
        });
        let out = f()?;
        let left = TAPE.with(|t| t.borrow().replay.as_ref().map_or(0, |q| q.len()));
        drop(end);
        if left > 0 {
            candle_core::bail!("dropout replay: {left} masks were not used");
        }
        Ok(out)
    }

    /// The seed of the next dropout mask: replayed, or drawn.
    pub fn seed() -> Result<u64> {
        let replayed = TAPE.with(|t| t.borrow_mut().replay.as_mut().map(|q| q.pop_front()));
        let seed = match replayed {
            Some(Some(seed)) => seed,
            Some(None) => candle_core::bail!("dropout replay: more masks asked for than were recorded"),
            None => rand::random(),
        };
        TAPE.with(|t| {
            if let Some(kept) = &mut t.borrow_mut().kept {
                kept.push(seed);
            }
        });
        Ok(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The fused training op gives x, A and B the gradients of the plain composition `x Wᵀ + b + s·x Aᵀ Bᵀ`,
    /// on dense and quantized bases; with dropout the gradients stay finite and A, B still learn.
    #[test]
    fn lora_linear_gradients_match_the_composition() {
        let w = crate::testing::seeded_randn(101, 0.0, 0.5, &[32, 64]);
        let bias = crate::testing::seeded_randn(102, 0.0, 0.5, &[32]);
        for quantized in [false, true] {
            let mut lin = if quantized {
                Linear::quantize(&w, Some(bias.clone()), GgmlDType::Q8_0).unwrap()
            } else {
                Linear::dense(w.clone(), Some(bias.clone())).unwrap()
            };
            let wd = lin.dense_weight(DType::F32).unwrap();
            let x = Var::from_tensor(&crate::testing::seeded_randn(103, 0.0, 1.0, &[2, 20, 64])).unwrap();
            let a = Var::from_tensor(&crate::testing::seeded_randn(104, 0.0, 0.2, &[4, 64])).unwrap();
            let b = Var::from_tensor(&crate::testing::seeded_randn(105, 0.0, 0.2, &[32, 4])).unwrap();
            let coef = crate::testing::seeded_randn(106, 0.0, 1.0, &[2, 20, 32]);
            lin.set_lora(Some(LoraAdapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                dropout: 0.0,
            }));
            let ours = lin.forward(x.as_tensor()).unwrap();
            let xt = x.as_tensor();
            let plain = (xt.broadcast_matmul(&wd.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
                + (xt.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap())
                    .broadcast_matmul(&b.as_tensor().t().unwrap())
                    .unwrap()
                    .affine(2.0, 0.0)
                    .unwrap())
            .unwrap();
            let dv = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(dv < 1e-3, "quantized {quantized}: forward differs by {dv}");
            let g1 = (&ours * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&plain * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                let (p, q) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(!p.track_op(), "gradients carry no graph");
                let d = (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let tol = if quantized && name == "A" { 1e-2 } else { 1e-3 };
                assert!(d < tol, "quantized {quantized}: gradient of {name} off by {d}");
            }
            lin.set_lora(Some(LoraAdapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                dropout: 0.5,
            }));
            let y = lin.forward(x.as_tensor()).unwrap();
            let g = (&y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &a, &b] {
                let s = g.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(s.is_finite() && s > 0.0);
            }
        }
    }

    /// On CUDA a quantized layer's training product (value and input gradient, bf16 activations) is the
    /// dequantized weight's: against the CPU's f32 product of the same dequantized weight.
    #[test]
    fn quantized_training_product_on_cuda_is_the_dequantized_one() {
        let Some(gpu) = crate::testing::cuda_device() else { return };
        let w = crate::testing::seeded_randn(130, 0.0, 0.3, &[64, 256]);
        let x = crate::testing::seeded_randn(131, 0.0, 1.0, &[2, 9, 256]).to_dtype(DType::BF16).unwrap();
        let coef = crate::testing::seeded_randn(132, 0.0, 1.0, &[2, 9, 64]);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q4_0, GgmlDType::Q6K, GgmlDType::Q5K] {
            let lin = Linear::quantize(&w.to_device(&gpu).unwrap(), None, dtype).unwrap();
            let wd = lin.dense_weight(DType::F32).unwrap().to_device(&candle_core::Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap();
            let y = lin.forward(xv.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
            let gx = (&y * coef.to_device(&gpu).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = gx
                .get(xv.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&candle_core::Device::Cpu)
                .unwrap();
            let x32 = x.to_dtype(DType::F32).unwrap();
            let want_y = x32.broadcast_matmul(&wd.t().unwrap()).unwrap();
            let want_gx = coef.broadcast_matmul(&wd).unwrap();
            for (what, got, want) in
                [("value", y.to_device(&candle_core::Device::Cpu).unwrap(), want_y), ("input gradient", gx, want_gx)]
            {
                let size = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-2 * size, "{dtype:?}: {what} off by {d} (largest {size})");
            }
        }
    }

    /// The residual forms of a frozen layer (`forward_residual`, `forward_swiglu_residual`) give the values
    /// and gradients of the plain composition `r + W x` and `r + W (silu(g) · u)`, on dense and quantized
    /// weights; with an adapter they are that composition.
    #[test]
    fn residual_forms_match_the_composition() {
        let w = crate::testing::seeded_randn(120, 0.0, 0.3, &[32, 64]);
        for quantized in [false, true] {
            let mut lin = match quantized {
                true => Linear::quantize(&w, None, GgmlDType::Q8_0).unwrap(),
                false => Linear::dense(w.clone(), None).unwrap(),
            };
            let wd = lin.dense_weight(DType::F32).unwrap();
            for adapter in [false, true] {
                if adapter {
                    let a = crate::testing::seeded_randn(125, 0.0, 0.2, &[4, 64]);
                    let b = crate::testing::seeded_randn(126, 0.0, 0.2, &[32, 4]);
                    lin.set_lora(Some(LoraAdapter { a, b, scale: 2.0, dropout: 0.0 }));
                }
                let plain_of = |x: &Tensor| {
                    let mut y = x.broadcast_matmul(&wd.t()?)?;
                    if let Some(l) = lin.lora() {
                        y = (y + x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?.affine(l.scale, 0.0)?)?;
                    }
                    Ok::<_, candle_core::Error>(y)
                };
                let var = |seed: u64, shape: &[usize]| {
                    Var::from_tensor(&crate::testing::seeded_randn(seed, 0.0, 1.0, shape)).unwrap()
                };
                let (x, gate, up, r) =
                    (var(121, &[2, 5, 64]), var(122, &[2, 5, 64]), var(123, &[2, 5, 64]), var(124, &[2, 5, 32]));
                let coef = crate::testing::seeded_randn(127, 0.0, 1.0, &[2, 5, 32]);
                let check = |ours: Tensor, plain: Tensor, vars: &[&Var], what: &str| {
                    let dv = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(dv < 1e-4, "{what} (quantized {quantized}, adapter {adapter}): value off by {dv}");
                    let g1 = (&ours * &coef).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&plain * &coef).unwrap().sum_all().unwrap().backward().unwrap();
                    for v in vars {
                        let (p, q) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                        let d = (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        assert!(d < 1e-4, "{what} (quantized {quantized}, adapter {adapter}): gradient off by {d}");
                    }
                };
                let ours = lin.forward_residual(x.as_tensor(), r.as_tensor()).unwrap();
                let plain = (r.as_tensor() + plain_of(x.as_tensor()).unwrap()).unwrap();
                check(ours, plain, &[&x, &r], "residual");
                let ours = lin.forward_swiglu_residual(gate.as_tensor(), up.as_tensor(), r.as_tensor()).unwrap();
                let act = (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap();
                let plain = (r.as_tensor() + plain_of(&act).unwrap()).unwrap();
                check(ours, plain, &[&gate, &up, &r], "swiglu residual");
            }
        }
    }

    /// The fused CUDA LoRA layer (f32 and bf16 activations, every built rank, with and without dropout,
    /// widths that leave partial tiles and splits) against the composed ops on the CPU in f32 over the same
    /// (rounded) inputs and the same dropout masks: output and the gradients of x, A and B.
    #[test]
    fn fused_lora_on_cuda_matches_the_cpu_composition() {
        let Some(gpu) = crate::testing::cuda_device() else { return };
        let cpu = candle_core::Device::Cpu;
        let mut cases: Vec<(usize, usize, usize, usize)> = [4, 8, 16, 32, 64].map(|r| (37, 264, 136, r)).to_vec();
        // Many rows (several row splits summed by the last block), few (one split), a wide output (64-row
        // expand blocks).
        cases.extend([(300, 1032, 520, 8), (8, 264, 136, 8), (40, 136, 2056, 8)]);
        for (case, &(t, in_f, out_f, r)) in cases.iter().enumerate() {
            for dtype in [DType::F32, DType::BF16] {
                for dropout in [0.0, 0.25] {
                    let s = 500 + 10 * case as u64;
                    let rounded = |seed: u64, std: f32, shape: &[usize]| {
                        crate::testing::seeded_randn(seed, 0.0, std, shape).to_dtype(dtype).unwrap()
                    };
                    let (w, bias, x) = (
                        rounded(s, 0.1, &[out_f, in_f]),
                        rounded(s + 1, 0.5, &[out_f]),
                        rounded(s + 2, 1.0, &[2, t, in_f]),
                    );
                    let a = crate::testing::seeded_randn(s + 3, 0.0, 0.1, &[r, in_f]);
                    let b = crate::testing::seeded_randn(s + 4, 0.0, 0.1, &[out_f, r]);
                    let coef = crate::testing::seeded_randn(s + 5, 0.0, 1.0, &[2, t, out_f]);
                    let run = |device: &candle_core::Device, dtype: DType, seeds: Option<Vec<u64>>| {
                        let to = |x: &Tensor| x.to_dtype(dtype)?.to_device(device);
                        let mut lin = Linear::dense(to(&w)?, Some(to(&bias)?))?;
                        let (xv, av, bv) = (
                            Var::from_tensor(&to(&x)?)?,
                            Var::from_tensor(&a.to_device(device)?)?,
                            Var::from_tensor(&b.to_device(device)?)?,
                        );
                        let adapter =
                            LoraAdapter { a: av.as_tensor().clone(), b: bv.as_tensor().clone(), scale: 2.0, dropout };
                        lin.set_lora(Some(adapter));
                        let (y, seeds) = match seeds {
                            Some(seeds) => (dropout_tape::replay(seeds, || lin.forward(xv.as_tensor()))?, vec![]),
                            None => {
                                let (y, seeds) = dropout_tape::record(|| lin.forward(xv.as_tensor()));
                                (y?, seeds)
                            }
                        };
                        let grads = (y.to_dtype(DType::F32)? * coef.to_device(device)?)?.sum_all()?.backward()?;
                        let mut all = vec![y.to_dtype(DType::F32)?.to_device(&cpu)?];
                        for v in [&xv, &av, &bv] {
                            all.push(
                                grads.get(v.as_tensor()).expect("a gradient").to_dtype(DType::F32)?.to_device(&cpu)?,
                            );
                        }
                        Ok::<_, candle_core::Error>((all, seeds))
                    };
                    let (got, seeds) = run(&gpu, dtype, None).unwrap();
                    assert_eq!(seeds.len(), usize::from(dropout > 0.0));
                    let (want, _) = run(&cpu, DType::F32, Some(seeds)).unwrap();
                    let tol = if dtype == DType::F32 { 1e-4 } else { 1.5e-2 };
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let size = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        let diff = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        let what = ["output", "dx", "dA", "dB"][i];
                        assert!(
                            diff <= tol * size,
                            "case {case} {dtype:?} p {dropout}: {what} off by {diff} (largest {size})"
                        );
                    }
                }
            }
        }
    }

    /// The quantized layer's backward pass gives the gradient a dense layer of the dequantized weight gives,
    /// for decode-sized and prefill-sized inputs.
    #[test]
    fn quantized_backward_matches_dense() {
        let w = crate::testing::seeded_randn(107, 0.0, 0.5, &[48, 64]);
        let q = Linear::quantize(&w, None, GgmlDType::Q8_0).unwrap();
        let dense = Linear::dense(q.dense_weight(DType::F32).unwrap(), None).unwrap();
        for rows in [3, 40] {
            let x = Var::from_tensor(&crate::testing::seeded_randn(108, 0.0, 1.0, &[1, rows, 64])).unwrap();
            let coef = crate::testing::seeded_randn(109, 0.0, 1.0, &[1, rows, 48]);
            let grad = |l: &Linear| {
                let y = l.forward(x.as_tensor()).unwrap();
                let g = (y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).expect("gradient reaches the input").clone()
            };
            let (gq, gd) = (grad(&q), grad(&dense));
            let d = (gq - gd).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: gradient differs by {d}");
            // The training forward is the dequantized product; inference (8-bit activations) stays within the
            // activations' rounding: half a step of each 32-block times the weights' magnitudes.
            let yq = q.forward(x.as_tensor()).unwrap();
            let yd = dense.forward(&x.as_tensor().detach()).unwrap();
            let d = (&yq - &yd).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: training forward differs from the dequantized product by {d}");
            let yn = q.forward(&x.as_tensor().detach()).unwrap();
            let d = (yn - yd).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let xmax = x.as_tensor().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let wsum = dense.dense_weight(DType::F32).unwrap().abs().unwrap().sum(1).unwrap().max_all().unwrap();
            let bound = wsum.to_scalar::<f32>().unwrap() * xmax / 127.0 / 2.0;
            assert!(d <= bound, "rows {rows}: inference differs by {d}, beyond the rounding bound {bound}");
        }
    }

    /// A Q4_0 layer of 64 × 128 random weights (seed `seed`), 24 rows of input (seed `seed + 1`), their product
    /// with the dequantized weight in f32 and that product's largest magnitude.
    fn q4_0_rows(seed: u64) -> (Linear, Tensor, Tensor, f32) {
        let w = crate::testing::seeded_randn(seed, 0.0, 0.5, &[64, 128]);
        let lin = Linear::quantize(&w, None, GgmlDType::Q4_0).unwrap();
        let x = crate::testing::seeded_randn(seed + 1, 0.0, 1.0, &[1, 24, 128]);
        let reference = x.broadcast_matmul(&lin.dense_weight(DType::F32).unwrap().t().unwrap()).unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        (lin, x, reference, scale)
    }

    /// Many rows of a 32-wide quantized weight: generation's pass runs the 8-bit kernels (close to the
    /// dequantized product); while `ExactScoring` is held the pass is the dequantized product itself.
    #[test]
    fn exact_scoring_holds_many_row_products_to_the_dequantized_weight() {
        let (lin, x, reference, scale) = q4_0_rows(111);
        let max_diff =
            |a: &Tensor| (a - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let exact = {
            let _scoring = ExactScoring::hold();
            lin.forward(&x).unwrap()
        };
        assert!(max_diff(&exact) <= 1e-5 * scale, "scoring: {}", max_diff(&exact));
        // (Other tests may hold scoring meanwhile: this pass is then exact, which the bound admits too.)
        let fast = max_diff(&lin.forward(&x).unwrap());
        assert!(fast < 2e-2 * scale, "generation: 8-bit activations, {fast} of {scale}");
    }

    /// While a training pass holds `TrainingProducts`, a frozen product of an input that tracks no gradient
    /// (the first layer's projections of the embeddings) is the training product, the dequantized weight's,
    /// not the 8-bit kernels' that the same rows take at inference.
    #[test]
    fn training_products_hold_untracked_inputs_to_the_dequantized_weight() {
        let (lin, x, reference, scale) = q4_0_rows(113);
        let training = {
            let _training = TrainingProducts::hold();
            lin.forward(&x).unwrap()
        };
        let d = (training - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-5 * scale, "untracked input in training: off the dequantized product by {d} of {scale}");
    }
}

//! The one linear-layer seam every architecture goes through: dense or quantized weights, an optional bias,
//! and room for an adapter (LoRA) on top. Architectures never touch weight storage directly.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use std::sync::Arc;

/// From this many input rows on, a quantized CPU matmul dequantizes and uses a dense GEMM.
const DEQUANT_GEMM_ROWS: usize = 16;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]`, in the model's compute dtype.
    Dense(Tensor),
    /// GGUF blocks (Q4_0 … Q8_0, K-quants); activations go through f32.
    Quantized(Arc<QTensor>),
}

/// A low-rank adapter added to a frozen base: `y += scale * B(A(x))`.
/// `a` is `[rank, in]`, `b` is `[out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
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

    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
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

    /// The weight as a dense tensor of `dtype` (dequantizing if needed).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(dtype),
            LinearWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, &self.qmatmul) {
            // Many rows on the CPU: dequantizing the weight once and running one f32 GEMM is far faster
            // than candle's per-row quantized dot products (prefill, scoring, training).
            (LinearWeight::Quantized(q), _)
                if x.device().is_cpu() && x.elem_count() / self.in_features >= DEQUANT_GEMM_ROWS =>
            {
                let w = q.dequantize(x.device())?;
                let dtype = x.dtype();
                let x32 = x.to_dtype(DType::F32)?;
                let rows = x.elem_count() / self.in_features;
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = self.out_features;
                x32.reshape((rows, self.in_features))?.matmul(&w.t()?)?.reshape(out_dims)?.to_dtype(dtype)?
            }
            (LinearWeight::Quantized(_), Some(qm)) => {
                let dtype = x.dtype();
                let y = qm.forward(&x.to_dtype(DType::F32)?)?;
                y.to_dtype(dtype)?
            }
            (LinearWeight::Dense(w), _) => match x.dims() {
                [b1, b2, _, _] => x.matmul(&w.broadcast_left((*b1, *b2))?.t()?)?,
                [b, t, _] if *t == 1 || !x.is_contiguous() => x.matmul(&w.broadcast_left(*b)?.t()?)?,
                // Folding the batch into rows gives one large GEMM instead of a batched one.
                [b, t, i] => x.reshape((b * t, *i))?.matmul(&w.t()?)?.reshape((*b, *t, self.out_features))?,
                _ => x.matmul(&w.t()?)?,
            },
            (LinearWeight::Quantized(_), None) => unreachable!("quantized linear always has a QMatMul"),
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let delta = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
                y + (delta * l.scale)?
            }
            None => Ok(y),
        }
    }
}

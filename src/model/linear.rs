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

impl Linear {
    /// `x Wᵀ` through the fastest inference path (no gradient tracking).
    fn base_product(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.weight, &self.qmatmul) {
            // Many rows on the CPU: dequantizing the weight once and running one f32 GEMM is far faster
            // than candle's per-row quantized dot products (prefill, scoring).
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
                qm.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            (LinearWeight::Dense(w), _) => match x.dims() {
                [b1, b2, _, _] => x.matmul(&w.broadcast_left((*b1, *b2))?.t()?)?,
                [b, t, _] if *t == 1 || !x.is_contiguous() => x.matmul(&w.broadcast_left(*b)?.t()?)?,
                // Folding the batch into rows gives one large GEMM instead of a batched one.
                [b, t, i] => x.reshape((b * t, *i))?.matmul(&w.t()?)?.reshape((*b, *t, self.out_features))?,
                _ => x.matmul(&w.t()?)?,
            },
            (LinearWeight::Quantized(_), None) => unreachable!("quantized linear always has a QMatMul"),
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.track_op() {
            // Training. candle's matmul backward computes the gradient of both operands, so a frozen weight
            // would still get a weight-sized gradient (a full extra GEMM per layer, held until the step ends),
            // and its quantized matmul records no backward at all. The product comes from the inference path
            // instead, with a backward for the input only: `dx = dy · W`, a quantized W dequantized just for
            // that moment, so the base stays quantized in memory (QLoRA).
            let weight = self.weight.clone();
            super::autograd::with_backward(x, self.base_product(&x.detach())?, "frozen-linear", move |x, _, g| {
                let w = match &weight {
                    LinearWeight::Dense(w) => w.clone(),
                    LinearWeight::Quantized(q) => q.dequantize(g.device())?,
                };
                let (out_f, in_f) = w.dims2()?;
                let rows = g.elem_count() / out_f;
                let grad = g.to_dtype(w.dtype())?.reshape((rows, out_f))?.matmul(&w)?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank ≥ 1") = in_f;
                grad.reshape(dims)?.to_dtype(x.dtype())
            })?
        } else {
            self.base_product(x)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let xd = if l.dropout > 0.0 { candle_nn::ops::dropout(x, l.dropout)? } else { x.clone() };
                y + super::autograd::lora_delta(&xd, &l.a, &l.b, l.scale)?
            }
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The quantized layer's backward pass gives the gradient a dense layer of the dequantized weight gives,
    /// for decode-sized and prefill-sized inputs.
    #[test]
    fn quantized_backward_matches_dense() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (48, 64), &dev).unwrap();
        let q = Linear::quantize(&w, None, GgmlDType::Q8_0).unwrap();
        let dense = Linear::dense(q.dense_weight(DType::F32).unwrap(), None).unwrap();
        for rows in [3, 40] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, rows, 64), &dev).unwrap()).unwrap();
            let coef = Tensor::randn(0f32, 1.0, (1, rows, 48), &dev).unwrap();
            let grad = |l: &Linear| {
                let y = l.forward(x.as_tensor()).unwrap();
                let g = (y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).expect("gradient reaches the input").clone()
            };
            let (gq, gd) = (grad(&q), grad(&dense));
            let d = (gq - gd).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: gradient differs by {d}");
            // And the forward value is the quantized product either way.
            let yq = q.forward(x.as_tensor()).unwrap();
            let yn = q.forward(&x.as_tensor().detach()).unwrap();
            let d = (yq - yn).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "rows {rows}: training forward differs by {d}");
        }
    }
}

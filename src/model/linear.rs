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

    /// Put these layers' dense weights (same input width, dtype and device) side by side in one buffer, each
    /// layer keeping a view of its own rows, so that a step over many rows can multiply them as one matrix (the
    /// batched decode graph does: q, k, v in one GEMM). Layers that are not all dense are left as they are.
    pub fn place_side_by_side(layers: &mut [&mut Linear]) -> Result<()> {
        let dense: Vec<&Tensor> = layers
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeight::Dense(w) => Some(w),
                LinearWeight::Quantized(_) => None,
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
    fn dequantized_product(&self, q: &candle_core::quantized::QTensor, x: &Tensor) -> Result<Tensor> {
        let w = q.dequantize(x.device())?;
        let dtype = x.dtype();
        let rows = x.elem_count() / self.in_features;
        x.to_dtype(DType::F32)?
            .reshape((rows, self.in_features))?
            .matmul(&w.t()?)?
            .reshape(self.out_dims(x))?
            .to_dtype(dtype)
    }

    /// Inference as for a pass of many rows even when `x` has few: on the CPU a quantized weight is then
    /// dequantized for an f32 product, like the layers of that pass got (the LM head at the last positions of
    /// a prefill, so a row's logits do not depend on how many rows the pass selected).
    pub fn forward_as_many_rows(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Quantized(q) if x.device().is_cpu() && self.lora.is_none() && !x.track_op() => {
                self.with_bias(self.dequantized_product(q, x)?)
            }
            _ => self.forward(x),
        }
    }

    /// Does a pass of `rows` rows take the many-rows path (see [`Linear::forward_as_many_rows`])?
    pub fn many_rows(rows: usize) -> bool {
        rows >= DEQUANT_GEMM_ROWS
    }

    /// `x Wᵀ` through the fastest inference path (no gradient tracking).
    fn base_product(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.weight, &self.qmatmul) {
            // Many rows on the CPU: dequantizing the weight once and running one f32 GEMM is far faster
            // than candle's per-row quantized dot products (prefill, scoring).
            (LinearWeight::Quantized(q), _)
                if x.device().is_cpu() && x.elem_count() / self.in_features >= DEQUANT_GEMM_ROWS =>
            {
                self.dequantized_product(q, x)?
            }
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
        })
    }
}

impl Linear {
    /// `dy · W` for the frozen weight, shaped like `x` (a quantized W is dequantized just for this).
    fn input_grad(weight: &LinearWeight, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let w = match weight {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Quantized(q) => q.dequantize(g.device())?,
        };
        let out_f = w.dim(0)?;
        let rows = g.elem_count() / out_f;
        let grad = g.to_dtype(w.dtype())?.reshape((rows, out_f))?.matmul(&w)?;
        grad.reshape(x.dims())?.to_dtype(x.dtype())
    }

    /// The base product plus bias, no gradient tracking.
    fn frozen_value(&self, x: &Tensor) -> Result<Tensor> {
        self.with_bias(self.base_product(x)?)
    }

    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Training with an adapter: `W x + b + scale · B A (mask ⊙ x / keep)` as one op of (x, A, B). Its graph
    /// node keeps only x (shared with the layer's other projections), A, B, the dropout mask as bytes and the
    /// output; the backward recomputes the rank-r product instead of storing the dropped input, the adapter's
    /// output or the base output.
    fn forward_lora_training(&self, x: &Tensor, l: &LoraAdapter) -> Result<Tensor> {
        let (in_f, out_f) = (self.in_features, self.out_features);
        let rows = x.elem_count() / in_f;
        let keep = 1.0 - l.dropout as f64;
        let mask = if l.dropout > 0.0 {
            Some(Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(l.dropout as f64)?)
        } else {
            None
        };
        let cd = l.a.dtype();
        // The inverted-dropout factor 1/keep rides on the scale (fewer element-wise passes).
        let dropped = move |x: &Tensor, mask: &Option<Tensor>| -> Result<Tensor> {
            match mask {
                Some(m) => (x * m.to_dtype(x.dtype())?)?.reshape((rows, in_f))?.to_dtype(cd),
                None => x.reshape((rows, in_f))?.to_dtype(cd),
            }
        };
        let scale = if mask.is_some() { l.scale / keep } else { l.scale };
        let xd = dropped(&x.detach(), &mask)?;
        let delta = (xd.matmul(&l.a.detach().t()?)?.matmul(&l.b.detach().t()?)? * scale)?;
        let value = (self.frozen_value(&x.detach())? + delta.reshape(self.out_dims(x))?.to_dtype(x.dtype())?)?;
        let weight = self.weight.clone();
        crate::ops::autograd::with_backward3(x, &l.a, &l.b, value, "lora-linear", move |[x, a, b], needs, g| {
            let g32 = (g.reshape((rows, out_f))?.to_dtype(cd)? * scale)?;
            let xd = dropped(x, &mask)?;
            let gxa = g32.matmul(b)?; // [rows, r]
            let db = needs[2].then(|| g32.t()?.matmul(&xd.matmul(&a.t()?)?)).transpose()?;
            let da = needs[1].then(|| gxa.t()?.matmul(&xd)).transpose()?;
            let dx = if needs[0] {
                let mut lora_dx = gxa.matmul(a)?;
                if let Some(m) = &mask {
                    lora_dx = (lora_dx * m.reshape((rows, in_f))?.to_dtype(cd)?)?;
                }
                let base = Self::input_grad(&weight, x, g)?;
                Some((base + lora_dx.reshape(x.dims())?.to_dtype(x.dtype())?)?)
            } else {
                None
            };
            Ok((dx, da, db))
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
            // and its quantized matmul records no backward at all. The product comes from the inference path
            // instead, with a backward for the input only: `dx = dy · W`, a quantized W dequantized just for
            // that moment, so the base stays quantized in memory (QLoRA).
            let weight = self.weight.clone();
            crate::ops::autograd::with_backward(x, self.frozen_value(&x.detach())?, "frozen-linear", move |x, _, g| {
                Self::input_grad(&weight, x, g)
            })?
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
            // And the forward value is the quantized product either way.
            let yq = q.forward(x.as_tensor()).unwrap();
            let yn = q.forward(&x.as_tensor().detach()).unwrap();
            let d = (yq - yn).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "rows {rows}: training forward differs by {d}");
        }
    }
}

//! Building blocks shared by the architectures: norms, rotary embeddings, embeddings, activations and the
//! attention core. Each op has a fused path (candle's kernels, inference) and a differentiable path built
//! from primitive ops (training), picked by [`Ops`].

use super::cache::KvCache;
use super::config::{Activation, ModelConfig, RopeScaling};
use super::linear::Linear;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Result, Tensor};
use std::sync::{Arc, Mutex};

/// Which implementation of the non-matmul ops to use. Candle's fused kernels (rms_norm, layer_norm, rope,
/// softmax_last_dim) record no gradients, so anything that needs backprop selects `Differentiable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    #[default]
    Fused,
    Differentiable,
}

#[derive(Debug, Clone)]
pub enum Norm {
    Rms { weight: Tensor, eps: f64 },
    Layer { weight: Tensor, bias: Option<Tensor>, eps: f64 },
}

impl Norm {
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        match (self, ops) {
            (Norm::Rms { weight, eps }, Ops::Fused) => candle_nn::ops::rms_norm(x, weight, *eps as f32),
            (Norm::Rms { weight, eps }, Ops::Differentiable) => crate::ops::autograd::rms_norm(x, weight, *eps),
            (Norm::Layer { weight, bias, eps }, _) => {
                let zeros;
                let bias = match bias {
                    Some(b) => b,
                    None => {
                        zeros = weight.zeros_like()?;
                        &zeros
                    }
                };
                match ops {
                    Ops::Fused => candle_nn::ops::layer_norm(x, weight, bias, *eps as f32),
                    Ops::Differentiable => crate::ops::autograd::layer_norm(x, weight, bias, *eps),
                }
            }
        }
    }
}

/// Token embeddings: dense, or still quantized (GGUF) and dequantized row by row on lookup.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>, DType),
    /// Quantized rows packed for the CPU kernels (shared with a tied LM head), dequantized row by row on lookup.
    Packed(Arc<crate::ops::cpu::PackedMatrix>, DType),
    /// Half-precision rows kept as stored on the CPU (the tied LM head reads the same memory), widened to the
    /// compute dtype on lookup.
    Half(Tensor, DType),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(w) => Self::rows_of(w, ids),
            Embedding::Half(w, dtype) => Self::rows_of(w, ids)?.to_dtype(*dtype),
            Embedding::Quantized(q, dtype) => q.embedding(ids)?.to_dtype(*dtype),
            Embedding::Packed(p, dtype) => {
                let ids_dims = ids.dims().to_vec();
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut rows = Vec::with_capacity(ids.len() * p.cols());
                for &id in &ids {
                    if id as usize >= p.rows() {
                        candle_core::bail!("token id {id} is outside the vocabulary of {} entries", p.rows());
                    }
                    rows.extend(p.dequantize_row(id as usize));
                }
                let mut dims = ids_dims;
                dims.push(p.cols());
                Tensor::from_vec(rows, dims, &candle_core::Device::Cpu)?.to_dtype(*dtype)
            }
        }
    }

    /// The rows of a dense table at `ids`, shaped `ids.dims() + [hidden]`.
    fn rows_of(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(w.dim(1)?);
        w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
    }

    pub fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(w) | Embedding::Half(w, _) => w.elem_count() * w.dtype().size_in_bytes(),
            Embedding::Quantized(q, _) => q.storage_size_in_bytes(),
            Embedding::Packed(p, _) => p.bytes(),
        }
    }
}

/// The gated MLP's `act(gate) · up`; one op with its own backward when training a SiLU model.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation, ops: Ops) -> Result<Tensor> {
    match (act, ops) {
        (Activation::Silu, Ops::Differentiable) => crate::ops::autograd::swiglu(gate, up),
        (Activation::Silu, Ops::Fused) => crate::ops::fused::swiglu(gate, up),
        _ => activation(gate, act)? * up,
    }
}

/// `residual + down(act(gate) · up)`: in training a SiLU model's frozen `down` takes gate and up itself
/// (`Linear::forward_swiglu_residual`), so the activation is not kept for the backward pass.
pub fn gated_down_residual(
    down: &Linear,
    (gate, up): (&Tensor, &Tensor),
    act: Activation,
    ops: Ops,
    residual: &Tensor,
) -> Result<Tensor> {
    match (act, ops) {
        (Activation::Silu, Ops::Differentiable) => down.forward_swiglu_residual(gate, up, residual),
        _ => down.forward_residual(&gated(gate, up, act, ops)?, residual),
    }
}

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// Rotary position embeddings over the first `rotary_dim` dims of each head. The cos/sin table grows on
/// demand (doubling) up to the context window, so long-context models do not allocate it all up front.
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
    head_dim: usize,
    interleaved: bool,
    max_len: usize,
    dtype: DType,
    device: Device,
    /// cos, sin, and both multiplied by 1/√head_dim: rotating queries with the scaled pair applies attention's
    /// score scale for free.
    table: Mutex<[Tensor; 4]>,
}

impl Rotary {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim;
        let mut inv_freq: Vec<f32> =
            (0..dim / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64) as f32).collect();
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Llama3(s) => {
                // transformers' `_compute_llama3_parameters`, computed in f64 like its torch code in f32.
                let old_ctx = s.original_max_position_embeddings as f64;
                let low_wavelen = old_ctx / s.low_freq_factor;
                let high_wavelen = old_ctx / s.high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let new = if wavelen > low_wavelen {
                        freq / s.factor
                    } else if wavelen < high_wavelen {
                        freq
                    } else {
                        let smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * freq / s.factor + smooth * freq
                    };
                    *f = new as f32;
                }
            }
            RopeScaling::Factors(factors) => {
                for (f, d) in inv_freq.iter_mut().zip(factors) {
                    *f /= *d;
                }
            }
        }
        let initial = 1024.min(cfg.max_position_embeddings.max(1));
        let table = Self::build(&inv_freq, initial, cfg.head_dim, dtype, device)?;
        Ok(Self {
            inv_freq,
            rotary_dim: dim,
            head_dim: cfg.head_dim,
            interleaved: cfg.rope_interleaved,
            max_len: cfg.max_position_embeddings,
            dtype,
            device: device.clone(),
            table: Mutex::new(table),
        })
    }

    /// Rotation frequencies (after any rope scaling), one per rotated pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Pairs are adjacent dims (GGUF llama order) rather than the two halves of the head.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    fn build(inv_freq: &[f32], len: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<[Tensor; 4]> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in inv_freq {
                // f32 product like the reference, then cos/sin in f64 for accuracy.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let (cos_q, sin_q) = ((&cos * scale)?, (&sin * scale)?);
        Ok([cos, sin, cos_q, sin_q]
            .map(|t| t.to_dtype(dtype))
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .try_into()
            .expect("four tables"))
    }

    fn cos_sin(&self, offset: usize, len: usize, scaled: bool) -> Result<(Tensor, Tensor)> {
        let mut table = self.table.lock().expect("rotary table lock");
        let have = table[0].dim(0)?;
        if offset + len > have {
            let mut new_len = have.max(1);
            while new_len < offset + len {
                new_len *= 2;
            }
            let new_len = new_len.min(self.max_len.max(offset + len));
            *table = Self::build(&self.inv_freq, new_len, self.head_dim, self.dtype, &self.device)?;
        }
        let (c, s) = if scaled { (&table[2], &table[3]) } else { (&table[0], &table[1]) };
        Ok((c.narrow(0, offset, len)?, s.narrow(0, offset, len)?))
    }

    /// Rotate queries for attention: with fused ops the result is also multiplied by 1/√head_dim (free when
    /// every dim rotates; one multiply otherwise), which `attention` then expects; differentiable ops return
    /// the plain rotation.
    pub fn apply_query(&self, q: &Tensor, offset: usize, ops: Ops) -> Result<Tensor> {
        match ops {
            Ops::Fused if self.rotary_dim == self.head_dim => self.rotate(q, offset, ops, true),
            Ops::Fused => self.rotate(q, offset, ops, false)? * (1.0 / (self.head_dim as f64).sqrt()),
            Ops::Differentiable => self.rotate(q, offset, ops, false),
        }
    }

    /// The rotation tables of per-row positions `[b, t]` (rows of different lengths), gathered once per forward
    /// pass for every layer.
    pub fn angles_at(&self, positions: &Tensor) -> Result<RowAngles> {
        let (b, t) = positions.dims2()?;
        let half = self.inv_freq.len();
        if self.rotary_dim == 0 {
            let none = Tensor::zeros((b, t, 0), self.dtype, &self.device)?;
            return Ok(RowAngles { tables: [none.clone(), none.clone(), none.clone(), none] });
        }
        let last = positions.max_all()?.to_scalar::<u32>()? as usize;
        // Make the table long enough, then gather each row's rows of it: `[b, t, rotary_dim / 2]`.
        self.cos_sin(last, 1, false)?;
        let table = self.table.lock().expect("rotary table lock");
        let flat = positions.flatten_all()?.to_device(&self.device)?;
        let gather = |part: &Tensor| part.index_select(&flat, 0)?.reshape((b, t, half));
        let tables = [gather(&table[0])?, gather(&table[1])?, gather(&table[2])?, gather(&table[3])?];
        Ok(RowAngles { tables })
    }

    /// Rotate queries (as [`Rotary::apply_query`]) at per-row positions.
    pub fn apply_query_at(&self, q: &Tensor, angles: &RowAngles) -> Result<Tensor> {
        if self.rotary_dim == self.head_dim {
            self.rotate_at(q, angles, true)
        } else {
            self.rotate_at(q, angles, false)? * (1.0 / (self.head_dim as f64).sqrt())
        }
    }

    /// Rotate `x` (`[b, heads, t, head_dim]`) at per-row positions (fused ops only).
    pub fn apply_at(&self, x: &Tensor, angles: &RowAngles) -> Result<Tensor> {
        self.rotate_at(x, angles, false)
    }

    fn rotate_at(&self, x: &Tensor, angles: &RowAngles, scaled: bool) -> Result<Tensor> {
        if self.rotary_dim == 0 {
            return Ok(x.clone());
        }
        let [cos, sin, cos_q, sin_q] = &angles.tables;
        let (cos, sin) = if scaled { (cos_q, sin_q) } else { (cos, sin) };
        self.rotate_leading(x, |x| {
            if self.interleaved {
                candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
            }
        })
    }

    /// Apply `rope` to the first `rotary_dim` dims of each head and keep the rest (partial rotary).
    fn rotate_leading(&self, x: &Tensor, rope: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.rotary_dim == self.head_dim {
            return rope(x);
        }
        let rot = rope(&x.narrow(3, 0, self.rotary_dim)?)?;
        let pass = x.narrow(3, self.rotary_dim, self.head_dim - self.rotary_dim)?;
        Tensor::cat(&[&rot, &pass], 3)
    }

    /// Rotate `x` (`[b, heads, t, head_dim]`) for positions `offset..offset+t`.
    pub fn apply(&self, x: &Tensor, offset: usize, ops: Ops) -> Result<Tensor> {
        self.rotate(x, offset, ops, false)
    }

    fn rotate(&self, x: &Tensor, offset: usize, ops: Ops, scaled: bool) -> Result<Tensor> {
        if self.rotary_dim == 0 {
            return Ok(x.clone());
        }
        let t = x.dim(2)?;
        let (cos, sin) = self.cos_sin(offset, t, scaled)?;
        if ops == Ops::Differentiable {
            if let Some(y) = crate::ops::autograd::rope_heads(x, &cos, &sin, self.rotary_dim, self.interleaved)? {
                return Ok(y);
            }
        }
        self.rotate_leading(x, |x| match (self.interleaved, ops) {
            (false, Ops::Fused) => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin),
            (true, Ops::Fused) => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin),
            (interleaved, Ops::Differentiable) => crate::ops::autograd::rope(x, &cos, &sin, interleaved),
        })
    }
}

/// Per-row rotation tables (`[b, t, rotary_dim / 2]`: cos, sin, and both scaled by 1/√head_dim).
#[derive(Debug, Clone)]
pub struct RowAngles {
    tables: [Tensor; 4],
}

/// The mask tensor for `t` new tokens over `x`'s device, or `None` where `attention` needs none: a single
/// token, or fused ops on CUDA (whose softmax kernel masks as it goes).
pub fn causal_mask_for(t: usize, offset: usize, x: &Tensor, ops: Ops) -> Result<Option<Tensor>> {
    if t == 1 || (ops == Ops::Fused && x.device().is_cuda()) {
        return Ok(None);
    }
    Ok(Some(crate::ops::fused::causal_mask(t, offset, x.dtype(), x.device())?))
}

/// Scaled dot-product attention over the cache, with grouped-query heads handled by reshaping the queries
/// (no copies of K/V per query head).
/// `q`: `[b, heads, t, d]` from `Rotary::apply_query` (rotated, and with fused ops scaled by 1/√d), `k`/`v`:
/// `[b, kv_heads, t, d]` for the new tokens; `mask` in the compute dtype, from `causal_mask_for` (attention is
/// causal whenever `t > 1`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut KvCache,
    layer: usize,
    mask: Option<&Tensor>,
    ops: Ops,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let groups = h / kv_heads;
    let prev = cache.len();
    let (k_all, v_all) = cache.append(layer, k, v)?;
    // Writing into the cache buffer records no gradient: the differentiable path reads the new keys and values
    // themselves (after any cached prefix, which is constant for training).
    let (k_all, v_all) = match ops {
        Ops::Fused => (k_all, v_all),
        Ops::Differentiable if prev == 0 => {
            (crate::ops::autograd::heads_contiguous(k)?, crate::ops::autograd::heads_contiguous(v)?)
        }
        Ops::Differentiable => {
            (Tensor::cat(&[&k_all.narrow(2, 0, prev)?, k], 2)?, Tensor::cat(&[&v_all.narrow(2, 0, prev)?, v], 2)?)
        }
    };
    let scale = 1.0 / (d as f64).sqrt();
    match (ops, starts) {
        (Ops::Fused, _) => {
            // The shared prefix's length, keys and values for this layer, if the cache has one.
            let prefix = match cache.prefix() {
                Some(p) => {
                    let (kp, vp) =
                        p.layer(layer).ok_or_else(|| candle_core::Error::Msg("prefix layer missing".into()))?;
                    Some((p.len(), kp, vp))
                }
                None => None,
            };
            // Rows with spans on the GPU: one tensor-core kernel over [shared prefix | own span], where it applies.
            if let (Some(starts), true) = (starts, q.device().is_cuda() && crate::ops::fused::mma_attention_enabled()) {
                let (kb, vb) =
                    cache.layer_buffers(layer).ok_or_else(|| candle_core::Error::Msg("cache layer missing".into()))?;
                let prefix_kv = prefix.map(|(_, kp, vp)| (kp, vp));
                if let Some(out) = crate::ops::fused::span_attention(q, kb, vb, starts, prefix_kv, prev)? {
                    return Ok(out);
                }
            }
            // q comes pre-scaled (`Rotary::apply_query`). Scores stay in the compute dtype: they leave the
            // matmul in it, the mask is 0 / -inf (exact in any float type) and the softmax kernel accumulates
            // in f32 — casting around it only added two kernels per layer.
            let q = q.contiguous()?.reshape((b, kv_heads, groups * t, d))?;
            let own = q.matmul(&k_all.t()?)?; // [b, kv, g*t, total]
            let out = match (starts, prefix) {
                (None, _) => crate::ops::fused::masked_softmax(&own, mask, t, prev)?.matmul(&v_all)?,
                // Rows of different lengths: each row's visible span picked by the span softmax.
                (Some(starts), None) => crate::ops::fused::span_softmax(&own, starts, t, prev, 0)?.matmul(&v_all)?,
                // And a shared prefix: every row's queries against the one prefix, [kv, b*g*t, d] x [kv, d, p]
                // (not copied).
                (Some(starts), Some((p, kp, vp))) => {
                    let qp = q.transpose(0, 1)?.contiguous()?.reshape((kv_heads, b * groups * t, d))?;
                    // Each half's values: the prefix's `[kv, b*g*t, d]`, the own columns' `[b, kv, g*t, d]`.
                    let (from_shared, from_own) = if q.device().is_cuda() {
                        // On the GPU the prefix's scores and the own ones stay two tensors, one softmax over both
                        // (joining them copies the scores four times). The prefix is padded with zero columns to
                        // a multiple of 8: the products over it then take cuBLAS's aligned kernels (an odd width
                        // fell to a kernel several times slower).
                        let pad = p.next_multiple_of(8) - p;
                        let (kp, vp) =
                            (kp.squeeze(0)?.pad_with_zeros(1, 0, pad)?, vp.squeeze(0)?.pad_with_zeros(1, 0, pad)?);
                        let shared = qp.matmul(&kp.t()?)?;
                        let (probs_shared, probs_own) =
                            crate::ops::fused::span_softmax_split(&shared, &own, starts, t, prev, p)?;
                        (probs_shared.matmul(&vp)?, probs_own.matmul(&v_all)?)
                    } else {
                        // Scores over [prefix | own columns].
                        let shared =
                            qp.matmul(&kp.squeeze(0)?.t()?)?.reshape((kv_heads, b, groups * t, p))?.transpose(0, 1)?;
                        let scores = Tensor::cat(&[&shared, &own], 3)?;
                        let probs = crate::ops::fused::span_softmax(&scores, starts, t, prev, p)?;
                        let probs_shared = probs.narrow(3, 0, p)?.transpose(0, 1)?.contiguous()?.reshape((
                            kv_heads,
                            b * groups * t,
                            p,
                        ))?;
                        let from_own = probs.narrow(3, p, prev + t)?.contiguous()?.matmul(&v_all)?;
                        (probs_shared.matmul(&vp.squeeze(0)?)?, from_own)
                    };
                    (from_shared.reshape((kv_heads, b, groups * t, d))?.transpose(0, 1)? + from_own)?
                }
            };
            out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))
        }
        (Ops::Differentiable, Some(_)) => {
            candle_core::bail!("rows of different lengths and shared prefixes need inference ops")
        }
        (Ops::Differentiable, None) => {
            let q = q.contiguous()?.reshape((b, kv_heads, groups * t, d))?;
            crate::ops::autograd::attention(&q, &k_all.contiguous()?, &v_all.contiguous()?, groups, scale)
        }
    }
}

/// The last-position or all-position selection of hidden states before the LM head.
pub fn select_positions(x: &Tensor, all: bool) -> Result<Tensor> {
    if all {
        Ok(x.clone())
    } else {
        let t = x.dim(1)?;
        // With more than one row the last position of each row is strided: the norm kernels need it packed.
        x.narrow(1, t - 1, 1)?.contiguous()
    }
}

/// Split `[b, t, heads*d]` into `[b, heads, t, d]`.
pub fn split_heads(x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, heads, d))?.transpose(1, 2)
}

/// Apply a module to `x`; a tiny helper so architectures read as the math.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    m.forward(x)
}

//! Training ops with hand-written backward passes, for the differentiable path.
//!
//! candle's fused kernels (rms_norm, layer_norm, rope, softmax) record no gradient, and their compositions
//! from primitive ops keep every intermediate alive until the backward pass and launch many small kernels.
//! Each op here runs the fused inference kernel on a detached input and attaches a backward pass written out
//! by hand, so the graph holds just the op's input and output.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, MetalStorage, Result, Shape, Tensor, D,
};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor) -> Result<Grads3> + Send + Sync>;

/// A forward value computed ahead of time, handed over (copied) as the op's output exactly once.
struct Value(Mutex<Option<Tensor>>, &'static str);

impl Value {
    fn take(&self) -> Result<Tensor> {
        let v = self.0.lock().expect("precomputed value lock").take();
        v.ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.1)))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let v = self.take()?;
        let (st, layout) = v.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(c) => Ok((c.try_clone(layout)?, v.shape().clone())),
            _ => candle_core::bail!("{}: value on another device", self.1),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let v = self.take()?;
        let (st, layout) = v.storage_and_layout();
        match &*st {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(layout)?, v.shape().clone())),
            _ => candle_core::bail!("{}: value on another device", self.1),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        let v = self.take()?;
        let (st, layout) = v.storage_and_layout();
        match &*st {
            candle_core::Storage::Metal(c) => Ok((c.try_clone(layout)?, v.shape().clone())),
            _ => candle_core::bail!("{}: value on another device", self.1),
        }
    }

    /// The storage is copied as a whole: keep a compact one.
    fn new(value: Tensor, name: &'static str) -> Result<Self> {
        let value = if value.layout().start_offset() != 0 || !value.is_contiguous() { value.copy()? } else { value };
        Ok(Self(Mutex::new(Some(value)), name))
    }
}

/// An op of one input whose forward value was computed already and whose backward is `bwd(arg, res, grad)`.
struct Precomputed {
    value: Value,
    bwd: Backward,
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.value.1
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.value.metal()
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Detached: a gradient must not carry a graph (it would keep this step's activations alive in the
        // optimizer state).
        (self.bwd)(&arg.detach(), &res.detach(), &grad_res.detach()).map(Some)
    }
}

/// The same for three inputs; `bwd([args], grad)` returns a gradient for each input that needs one.
struct Precomputed3 {
    value: Value,
    bwd: Backward3,
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        self.value.1
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.value.metal()
    }

    fn bwd(&self, a1: &Tensor, a2: &Tensor, a3: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Grads3> {
        let needs = [a1.track_op(), a2.track_op(), a3.track_op()];
        (self.bwd)([&a1.detach(), &a2.detach(), &a3.detach()], needs, &grad_res.detach())
    }
}

/// `value` (computed from `x`, `a`, `b` without tracking) as a node of their graph, with
/// `bwd([x, a, b] detached, [which need a gradient], d value)`. Returned as is when none tracks a gradient.
pub fn with_backward3(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    name: &'static str,
    bwd: impl Fn([&Tensor; 3], [bool; 3], &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(value);
    }
    x.apply_op3(a, b, Precomputed3 { value: Value::new(value, name)?, bwd: Box::new(bwd) })
}

/// `value` (computed from `x` without tracking) as a node of `x`'s graph whose gradient is
/// `bwd(x, value, d value)`. When `x` tracks no gradient, `value` is returned as is.
pub fn with_backward(
    x: &Tensor,
    value: Tensor,
    name: &'static str,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Precomputed { value: Value::new(value, name)?, bwd: Box::new(bwd) })
}

/// RMSNorm `x / rms(x) · w`; the gradient flows to `x` only (norm weights are frozen).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let value = candle_nn::ops::rms_norm(&x.detach(), w, eps as f32)?;
    let w = w.clone();
    with_backward(x, value, "rms-norm", move |x, _, g| {
        let x32 = x.to_dtype(DType::F32)?;
        let rstd = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xhat = x32.broadcast_mul(&rstd)?;
        let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let proj = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        gw.broadcast_sub(&xhat.broadcast_mul(&proj)?)?.broadcast_mul(&rstd)?.to_dtype(x.dtype())
    })
}

/// LayerNorm `(x - mean) / std · w + b`; the gradient flows to `x` only.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let value = candle_nn::ops::layer_norm(&x.detach(), w, b, eps as f32)?;
    let w = w.clone();
    with_backward(x, value, "layer-norm", move |x, _, g| {
        let x32 = x.to_dtype(DType::F32)?;
        let centered = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xhat = centered.broadcast_mul(&rstd)?;
        let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let mean_gw = gw.mean_keepdim(D::Minus1)?;
        let proj = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        gw.broadcast_sub(&mean_gw)?
            .broadcast_sub(&xhat.broadcast_mul(&proj)?)?
            .broadcast_mul(&rstd)?
            .to_dtype(x.dtype())
    })
}

/// Rotary embedding of `x` `[b, h, t, d]` (contiguous); a rotation, so its gradient is the inverse rotation.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let apply = move |x: &Tensor, cos: &Tensor, sin: &Tensor| {
        if interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    };
    let value = apply(&x.detach(), cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_backward(x, value, "rope", move |_, _, g| apply(&g.contiguous()?, &cos, &neg_sin))
}

/// Attention probabilities: softmax over the last dim of `scores` (+ `mask`, broadcast over the leading dims
/// as `[b, kv, groups, t, total]`), computed in f32 and returned in `scores`' dtype. The backward is
/// `p · (g - Σ g·p)`; the mask and the dtype casts pass gradients through unchanged.
pub fn attention_probs(scores: &Tensor, mask: Option<&Tensor>, groups: usize) -> Result<Tensor> {
    let (b, kv, gt, total) = scores.dims4()?;
    let s32 = scores.detach().to_dtype(DType::F32)?;
    let s32 = match mask {
        Some(m) => s32
            .reshape((b, kv, groups, gt / groups, total))?
            .broadcast_add(&m.to_dtype(DType::F32)?)?
            .reshape((b, kv, gt, total))?,
        None => s32,
    };
    let value = candle_nn::ops::softmax_last_dim(&s32)?.to_dtype(scores.dtype())?;
    with_backward(scores, value, "attention-softmax", |x, p, g| {
        let p = p.to_dtype(DType::F32)?;
        let g = g.to_dtype(DType::F32)?;
        let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
        (g.broadcast_sub(&dot)? * p)?.to_dtype(x.dtype())
    })
}

/// Per-row negative log-likelihood of `targets` (u32 `[n]`) under `logits` (`[n, vocab]`, f32): `[n]`.
/// The backward is `softmax(logits) - onehot(target)`, scaled by each row's incoming gradient.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let detached = logits.detach();
    let logp = candle_nn::ops::log_softmax(&detached, D::Minus1)?;
    let value = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let targets = targets.unsqueeze(1)?;
    with_backward(logits, value, "cross-entropy", move |x, _, g| {
        let g = g.unsqueeze(1)?; // [n, 1]
        let probs = candle_nn::ops::softmax_last_dim(x)?.broadcast_mul(&g)?;
        probs.scatter_add(&targets, &g.neg()?, 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradient of `sum(f(x) · coef)` for each implementation; both must agree.
    fn grads(f: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> f32 {
        let coef = Tensor::randn(0f32, 1.0, f(x).shape(), &Device::Cpu).unwrap();
        let run = |h: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(x).unwrap();
            let y = h(v.as_tensor());
            let g = (y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(v.as_tensor()).unwrap().clone()
        };
        let (a, b) = (run(&f), run(&reference));
        let fa = f(x);
        let fr = reference(x);
        let dv = (fa - fr).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(dv < 1e-5, "forward values differ by {dv}");
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn backward_passes_match_primitive_compositions() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 16, &dev).unwrap();
        let rms_ref = |x: &Tensor| {
            let n = x.broadcast_div(&(x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?)?;
            n.broadcast_mul(&w)
        };
        let d = grads(|x| rms_norm(x, &w, 1e-5).unwrap(), |x| rms_ref(x).unwrap(), &x);
        assert!(d < 1e-5, "rms_norm gradient off by {d}");
        let ln_ref = |x: &Tensor| {
            let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let n = c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?)?;
            n.broadcast_mul(&w)?.broadcast_add(&b)
        };
        let d = grads(|x| layer_norm(x, &w, &b, 1e-5).unwrap(), |x| ln_ref(x).unwrap(), &x);
        assert!(d < 1e-5, "layer_norm gradient off by {d}");

        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        for inter in [false, true] {
            let slow = |x: &Tensor| {
                if inter {
                    candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin).unwrap()
                } else {
                    candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap()
                }
            };
            let d = grads(|x| rope(x, &cos, &sin, inter).unwrap(), slow, &q);
            assert!(d < 1e-5, "rope (interleaved {inter}) gradient off by {d}");
        }

        let scores = Tensor::randn(0f32, 2.0, (1, 2, 6, 3), &dev).unwrap(); // 2 groups × t=3
        let mask = crate::model::layers::causal_mask(3, 0, DType::F32, &dev).unwrap();
        let reference = |s: &Tensor| {
            let m = s.reshape((1, 2, 2, 3, 3)).unwrap().broadcast_add(&mask).unwrap().reshape((1, 2, 6, 3)).unwrap();
            candle_nn::ops::softmax(&m, D::Minus1).unwrap()
        };
        let d = grads(|s| attention_probs(s, Some(&mask), 2).unwrap(), reference, &scores);
        assert!(d < 1e-5, "attention softmax gradient off by {d}");

        let logits = Tensor::randn(0f32, 3.0, (4, 11), &dev).unwrap();
        let t = Tensor::new(&[3u32, 0, 10, 3], &dev).unwrap();
        let reference = |l: &Tensor| {
            let lp = candle_nn::ops::log_softmax(l, D::Minus1).unwrap();
            lp.gather(&t.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap()
        };
        let d = grads(|l| cross_entropy_rows(l, &t).unwrap(), reference, &logits);
        assert!(d < 1e-5, "cross-entropy gradient off by {d}");
    }
}

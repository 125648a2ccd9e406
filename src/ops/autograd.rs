//! Training ops with hand-written backward passes, for the differentiable path.
//!
//! candle's fused kernels (rms_norm, layer_norm, rope, softmax) record no gradient, and their compositions
//! from primitive ops keep every intermediate alive until the backward pass and launch many small kernels.
//! Each op here runs the fused inference kernel on a detached input and attaches a backward pass written out
//! by hand, so the graph holds just the op's input and output.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Result, Shape, Tensor, D,
};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
pub type Grads2 = (Option<Tensor>, Option<Tensor>);
type Backward2 = Box<dyn Fn([&Tensor; 2], [bool; 2], &Tensor) -> Result<Grads2> + Send + Sync>;
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

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

/// The same for two inputs; `bwd([args], [which need a gradient], grad)`.
struct Precomputed2 {
    value: Value,
    bwd: Backward2,
}

impl CustomOp2 for Precomputed2 {
    fn name(&self) -> &'static str {
        self.value.1
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.value.metal()
    }

    fn bwd(&self, a1: &Tensor, a2: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Grads2> {
        let needs = [a1.track_op(), a2.track_op()];
        (self.bwd)([&a1.detach(), &a2.detach()], needs, &grad_res.detach())
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

    fn bwd(&self, a1: &Tensor, a2: &Tensor, a3: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Grads3> {
        let needs = [a1.track_op(), a2.track_op(), a3.track_op()];
        (self.bwd)([&a1.detach(), &a2.detach(), &a3.detach()], needs, &res.detach(), &grad_res.detach())
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
    bwd: impl Fn([&Tensor; 3], [bool; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
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
        crate::ops::backward::rms_norm_backward(x, &w.to_dtype(x.dtype())?, &g.to_dtype(x.dtype())?, eps)
    })
}

/// LayerNorm `(x - mean) / std · w + b`; the gradient flows to `x` only.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let value = candle_nn::ops::layer_norm(&x.detach(), w, b, eps as f32)?;
    let w = w.clone();
    with_backward(x, value, "layer-norm", move |x, _, g| {
        crate::ops::backward::layer_norm_backward(x, &w.to_dtype(x.dtype())?, &g.to_dtype(x.dtype())?, eps)
    })
}

/// Rotary embedding of `x` `[b, h, t, d]` (any layout: the graph keeps `x` as given, a view costs nothing);
/// a rotation, so its gradient is the inverse rotation.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let apply = move |x: &Tensor, cos: &Tensor, sin: &Tensor| {
        if interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    };
    let value = apply(&x.detach().contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_backward(x, value, "rope", move |_, _, g| apply(&g.contiguous()?, &cos, &neg_sin))
}

/// `x.index_select(rows, 0)` for `x` `[N, cols]`, whose gradient on CUDA is one kernel's scatter of the rows'
/// gradients (candle's index_add took a millisecond over a training batch's rows).
pub fn select_rows(x: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let value = x.detach().index_select(rows, 0)?;
    let rows = rows.clone();
    with_backward(x, value, "select-rows", move |x, _, g| {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() && g.dim(1)?.is_multiple_of(2) && g.dtype() != DType::F64 {
            return crate::ops::fused::cuda::scatter_add_rows(&g.to_dtype(x.dtype())?, &rows, x.dim(0)?);
        }
        x.zeros_like()?.index_add(&rows, &g.to_dtype(x.dtype())?, 0)
    })
}

/// `x` `[b, heads, t, d]` as a contiguous tensor. On CUDA a transposed view (the projection's `[b, t, heads, d]`
/// output) goes through one kernel whose backward writes the gradient back in that layout, where candle's copy
/// and the copy of the gradient the projection's backward would make were strided copies.
pub fn heads_contiguous(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 4 && !x.is_contiguous() && x.layout().stride()[3] == 1 {
        use crate::ops::fused::cuda::rope_strided;
        let (_, h, t, d) = x.dims4()?;
        let value = rope_strided(&x.detach(), None, 0, false, 1.0, 1.0, false)?;
        let token_major = x.layout().stride() == [t * h * d, d, h * d, 1];
        return with_backward(x, value, "heads-contiguous", move |_, _, g| {
            let g = if g.layout().stride()[3] == 1 { g.clone() } else { g.contiguous()? };
            rope_strided(&g, None, 0, false, 1.0, 1.0, token_major)
        });
    }
    x.contiguous()
}

/// Rotary embedding over whole heads on CUDA (the first `rot` dims rotate, the rest pass): `x` `[b, heads, t,
/// d]` is read through its strides (the projection's `[b, t, heads, d]` output, transposed) and its gradient
/// written back in the layout `x` has, so neither direction makes a transposing copy. `None` off CUDA.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize, interleaved: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 4 && x.layout().stride()[3] == 1 {
        use crate::ops::fused::cuda::rope_strided;
        let (_, h, t, d) = x.dims4()?;
        let value = rope_strided(&x.detach(), Some((cos, sin)), rot, interleaved, 1.0, 1.0, false)?;
        let token_major = x.layout().stride() == [t * h * d, d, h * d, 1];
        let (cos, sin) = (cos.clone(), sin.clone());
        let y = with_backward(x, value, "rope", move |_, _, g| {
            let g = if g.layout().stride()[3] == 1 { g.clone() } else { g.contiguous()? };
            rope_strided(&g, Some((&cos, &sin)), rot, interleaved, 1.0, -1.0, token_major)
        })?;
        return Ok(Some(y));
    }
    let _ = (x, cos, sin, rot, interleaved);
    Ok(None)
}

/// `value` (computed from `x` and `y` without tracking) as a node of their graph, with
/// `bwd([x, y] detached, [which need a gradient], d value)`.
pub fn with_backward2(
    x: &Tensor,
    y: &Tensor,
    value: Tensor,
    name: &'static str,
    bwd: impl Fn([&Tensor; 2], [bool; 2], &Tensor) -> Result<Grads2> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(x.track_op() || y.track_op()) {
        return Ok(value);
    }
    x.apply_op2(y, Precomputed2 { value: Value::new(value, name)?, bwd: Box::new(bwd) })
}

/// SwiGLU `silu(gate) · up`; the backward recomputes `silu` from `gate` instead of keeping it (one op,
/// `ops::backward::swiglu_backward`, in f32 inside).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    // The inference op: one kernel on CUDA (f32 inside, one rounding), candle's silu · up elsewhere.
    let value = crate::ops::fused::swiglu(&gate.detach(), &up.detach())?;
    with_backward2(gate, up, value, "swiglu", |[x, up], [need_gate, need_up], g| {
        let (dgate, dup) = crate::ops::backward::swiglu_backward(x, up, &g.to_dtype(x.dtype())?)?;
        Ok((need_gate.then_some(dgate), need_up.then_some(dup)))
    })
}

/// Causal grouped-query attention `softmax(q kᵀ · scale + mask) v` for `q` `[b, kv, groups·t, d]` (t new
/// tokens) and `k`, `v` `[b, kv, total, d]` (the cached keys first): query `i` sees keys `j ≤ total − t + i`.
/// Softmax in f32, returned as `[b, t, heads·d]` (heads = kv · groups). The backward recomputes the
/// probabilities from q and k rather than keeping the `[…, groups·t, total]` score matrices of every layer
/// alive; on the CPU no score matrix exists at all (`ops::cpu::train_attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, scale: f64) -> Result<Tensor> {
    if let Some(out) = tiled_cpu_attention(q, k, v, groups, scale)? {
        return Ok(out);
    }
    match tiled_cuda_attention(q, k, v, groups, scale)? {
        Some(out) => Ok(out),
        None => tensor_attention(q, k, v, groups, scale),
    }
}

/// [`attention`] through tensor ops (a score matrix per call, forward and backward).
fn tensor_attention(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, scale: f64) -> Result<Tensor> {
    let (b, kv, gt, d) = q.dims4()?;
    let (t, h) = (gt / groups, kv * groups);
    let total = k.dim(2)?;
    if total < t {
        candle_core::bail!("attention: {t} new tokens but {total} keys");
    }
    // A single new token sees every key: nothing to mask.
    let mask = (t > 1).then(|| crate::ops::fused::causal_mask(t, total - t, DType::F32, q.device())).transpose()?;
    let probs = move |q: &Tensor, k: &Tensor| -> Result<Tensor> {
        let s = (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let s = match &mask {
            Some(m) => s.reshape((b, kv, groups, t, total))?.broadcast_add(m)?.reshape((b, kv, gt, total))?,
            None => s,
        };
        candle_nn::ops::softmax_last_dim(&s)
    };
    let p = probs(&q.detach(), &k.detach())?;
    let out = p.to_dtype(v.dtype())?.matmul(&v.detach())?;
    drop(p);
    let value = out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))?;
    with_backward3(q, k, v, value, "attention", move |[q, k, v], needs, _, g| {
        let dtype = q.dtype();
        let g = g.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?.reshape((b, kv, gt, d))?;
        let p = probs(q, k)?; // f32 [b, kv, gt, total]
        let dv = needs[2].then(|| p.to_dtype(dtype)?.t()?.matmul(&g)).transpose()?;
        let dp = g.matmul(&v.t()?)?.to_dtype(DType::F32)?;
        let ds = ((&dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)? * &p)? * scale)?.to_dtype(dtype)?;
        let dq = needs[0].then(|| ds.matmul(k)).transpose()?;
        let dk = needs[1].then(|| ds.t()?.matmul(q)).transpose()?;
        Ok((dq, dk, dv))
    })
}

/// `(batch, kv_heads, t, total, head_dim)` of a causal attention's q `[b, kv, groups · t, d]` and k, v `[b, kv,
/// total, d]` when the shapes agree and the tiled paths are not switched off (`BILLION_TENSOR_ATTENTION`); `None`
/// sends the caller to the tensor ops.
type AttentionShape = (usize, usize, usize, usize, usize);
fn tiled_attention_shape(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize) -> Result<Option<AttentionShape>> {
    let (batch, kv_heads, gt, head_dim) = q.dims4()?;
    if groups == 0 || std::env::var_os(TENSOR_ATTENTION_ENV).is_some() {
        return Ok(None);
    }
    let (t, total) = (gt / groups, k.dim(2)?);
    let kv_dims = (batch, kv_heads, total, head_dim);
    let agree = gt == groups * t && k.dims4()? == kv_dims && v.dims4()? == kv_dims;
    Ok(agree.then_some((batch, kv_heads, t, total, head_dim)))
}

/// [`attention`] on the CPU in f32 through `ops::cpu::train_attention` (no score matrix, forward or
/// backward; the graph keeps each query row's log-sum-exp), where the shapes suit it: `None` otherwise.
fn tiled_cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, scale: f64) -> Result<Option<Tensor>> {
    use crate::ops::cpu::train_attention::{backward, forward, Dims};
    let on_cpu = [q, k, v].iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
    let Some((batch, kv_heads, t, total, head_dim)) = tiled_attention_shape(q, k, v, groups)?.filter(|_| on_cpu) else {
        return Ok(None);
    };
    let dims = Dims { batch, kv_heads, groups, t, total, head_dim, scale: scale as f32 };
    if !dims.supported() {
        return Ok(None);
    }
    let mut out = vec![0f32; q.elem_count()];
    let mut lse = vec![0f32; batch * kv_heads * groups * t];
    with_cpu_f32(&[q, k, v], |[qs, ks, vs]| forward(&dims, qs, ks, vs, &mut out, &mut lse))?;
    let value = Tensor::from_vec(out, (batch, t, kv_heads * groups * head_dim), q.device())?;
    // The backward pass reads the forward's output from the graph (`out`), not from a copy kept here.
    let bwd = move |[q, k, v]: [&Tensor; 3], needs: [bool; 3], out: &Tensor, g: &Tensor| -> Result<Grads3> {
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; q.elem_count()], vec![0f32; k.elem_count()], vec![0f32; v.elem_count()]);
        with_cpu_f32(&[q, k, v, out, &g.to_dtype(DType::F32)?], |[qs, ks, vs, os, gs]| {
            backward(&dims, qs, ks, vs, os, &lse, gs, &mut dq, &mut dk, &mut dv)
        })?;
        let grad = |need: bool, values: Vec<f32>, like: &Tensor| {
            need.then(|| Tensor::from_vec(values, like.dims(), like.device())).transpose()
        };
        Ok((grad(needs[0], dq, q)?, grad(needs[1], dk, k)?, grad(needs[2], dv, v)?))
    };
    Ok(Some(with_backward3(q, k, v, value, "attention", bwd)?))
}

/// [`attention`] on CUDA in bf16 through tensor-core kernels (`train_attention_forward` / `_backward` in
/// `ops::fused`: no score matrix, forward or backward; the graph keeps each query row's log-sum-exp), for head dims
/// 64 and 128: `None` otherwise.
fn tiled_cuda_attention(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, scale: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use crate::ops::fused::cuda::{train_attention_backward, train_attention_forward};
        let on_cuda = [q, k, v].iter().all(|x| x.device().is_cuda() && x.dtype() == DType::BF16);
        let Some((batch, kv_heads, t, total, head_dim)) = tiled_attention_shape(q, k, v, groups)?.filter(|_| on_cuda)
        else {
            return Ok(None);
        };
        if t == 0 || total < t || ![64, 128].contains(&head_dim) {
            return Ok(None);
        }
        // The kernels take the queries scaled (as the inference kernels do): the product records the scale's
        // gradient, the op's own is the scaled queries'. `[b, kv, groups · t, d]` is `[b, heads, t, d]` in memory.
        let heads = kv_heads * groups;
        let q_scaled = (q * scale)?.contiguous()?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let by_head = move |x: &Tensor| x.reshape((batch, heads, t, head_dim));
        let (value, lse) = train_attention_forward(&by_head(&q_scaled.detach())?, &k.detach(), &v.detach())?;
        let bwd = move |[q, k, v]: [&Tensor; 3], needs: [bool; 3], out: &Tensor, g: &Tensor| -> Result<Grads3> {
            let (dq, dk, dv) = train_attention_backward(&by_head(q)?, k, v, out, g, &lse)?;
            let dq = dq.reshape(q.shape())?;
            Ok((needs[0].then_some(dq), needs[1].then_some(dk), needs[2].then_some(dv)))
        };
        Ok(Some(with_backward3(&q_scaled, &k, &v, value, "attention", bwd)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, groups, scale);
        Ok(None)
    }
}

/// `f` over the f32 values of CPU tensors as they are stored (contiguous copies of those that are not).
fn with_cpu_f32<const N: usize, R>(xs: &[&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&**storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("tiled attention: contiguous f32 tensors on the CPU");
        };
        slices.push(&v[a..b]);
    }
    let slices: [&[f32]; N] = slices.try_into().map_err(|_| candle_core::Error::Msg("tiled attention".into()))?;
    Ok(f(slices))
}

/// Set (to anything) to train through the tensor-op attention on the CPU too: the reference the tiled
/// kernels are tested against.
pub const TENSOR_ATTENTION_ENV: &str = "BILLION_TENSOR_ATTENTION";

/// Mean-free per-row negative log-likelihood for the rows `rows` (u32 `[n]`) of `logits` (`[N, vocab]`, any
/// float dtype) against `targets` (u32 `[n]`): `[n]` f32. Selecting, casting and the log-softmax happen inside
/// one op whose graph keeps only `logits`; the backward writes `softmax - onehot` into the selected rows.
pub fn cross_entropy_rows(logits: &Tensor, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let picked = logits.detach().index_select(rows, 0)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let value = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    drop((picked, logp));
    let (rows, targets) = (rows.clone(), targets.unsqueeze(1)?);
    with_backward(logits, value, "cross-entropy", move |x, _, g| {
        let g = g.unsqueeze(1)?; // [n, 1]
        let picked = x.index_select(&rows, 0)?.to_dtype(DType::F32)?;
        let d = candle_nn::ops::softmax_last_dim(&picked)?.broadcast_mul(&g)?.scatter_add(&targets, &g.neg()?, 1)?;
        x.zeros_like()?.index_add(&rows, &d.to_dtype(x.dtype())?, 0)
    })
}

/// Bytes of f32 logits one chunk of [`head_cross_entropy`] holds at a time: on the GPU enough rows that each
/// chunk's two head products stay compute-bound (512 rows of Llama-3's 128k vocabulary), on the CPU little.
fn head_chunk_bytes(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        32 << 20
    } else {
        256 << 20
    }
}

/// The LM head and the cross-entropy as one op: the per-row negative log-likelihood (`[n]`, f32) of
/// `targets` (u32 `[n]`) under `head(x)` for `x` `[n, hidden]`, taken a bounded block of logits at a time
/// (rows × vocabulary), so the logits of every row never exist at once (`n × 128k` of them for Llama-3's
/// vocabulary). The head is frozen, so the gradient of each row's loss is known while its logits are at
/// hand: `(softmax − onehot) · W` (through `input_grad(x rows, d logits)`) is kept per row (`[n, hidden]`
/// f32) and the backward pass only scales it by the incoming gradient. No logits are computed again and
/// the graph keeps no logits at all.
pub fn head_cross_entropy(
    x: &Tensor,
    targets: &Tensor,
    vocab: usize,
    head: impl Fn(&Tensor) -> Result<Tensor>,
    input_grad: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    if targets.dims() != [n] {
        candle_core::bail!("head cross-entropy: {:?} targets for {n} rows", targets.dims());
    }
    let chunk = (head_chunk_bytes(x.device()) / (4 * vocab.max(1))).max(1);
    let track = x.track_op();
    let detached = x.detach();
    let (mut losses, mut grads) = (vec![], vec![]);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let rows = detached.narrow(0, start, len)?;
        let logits = head(&rows)?;
        if let Some((loss, d)) = fused_cross_entropy(&logits, &targets.narrow(0, start, len)?, track)? {
            losses.push(loss);
            if let Some(d) = d {
                grads.push(input_grad(&rows, &d.to_dtype(x.dtype())?)?.to_dtype(DType::F32)?);
            }
            continue;
        }
        let t = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        losses.push(logp.gather(&t, 1)?.squeeze(1)?.neg()?);
        if track {
            let ones = Tensor::ones((len, 1), DType::F32, x.device())?;
            let d = logp.exp()?.scatter_add(&t, &ones.neg()?, 1)?;
            grads.push(input_grad(&rows, &d.to_dtype(x.dtype())?)?.to_dtype(DType::F32)?);
        }
    }
    let value = Tensor::cat(&losses, 0)?;
    if !track {
        return Ok(value);
    }
    let per_row = Tensor::cat(&grads, 0)?;
    with_backward(x, value, "head-cross-entropy", move |x, _, g| {
        per_row.broadcast_mul(&g.to_dtype(DType::F32)?.unsqueeze(1)?)?.to_dtype(x.dtype())
    })
}

/// Each row's loss and, `with_grad`, the logits' gradient (`softmax - onehot`) in one kernel, for bf16 logits on
/// CUDA; `None` elsewhere (the caller composes log_softmax, gather and scatter_add).
type LossAndGrad = (Tensor, Option<Tensor>);
fn fused_cross_entropy(logits: &Tensor, targets: &Tensor, with_grad: bool) -> Result<Option<LossAndGrad>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && logits.dtype() == DType::BF16 && targets.dtype() == DType::U32 {
        return crate::ops::fused::cuda::cross_entropy_rows(logits, targets, with_grad).map(Some);
    }
    let _ = (logits, targets, with_grad);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The strided rotary kernel against the composed rotation (contiguous copy, candle's rope on the leading
    /// dims, the rest concatenated; CPU f32): values and the gradient reaching the projection's output, for
    /// whole and partial rotation, halves and interleaved pairs, f32 and bf16.
    #[cfg(feature = "cuda")]
    #[test]
    fn rope_heads_on_cuda_matches_the_composed_rotation() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let (b, t, h) = (2usize, 5usize, 3usize);
        // Whole and partial rotation, halves and interleaved pairs; 2-byte types take the 16-byte kernel where
        // rot / 2 (halves) or rot (pairs) and d − rot are multiples of 8, the one-value kernel otherwise.
        for (d, rot, interleaved) in
            [(16usize, 16usize, false), (16, 8, false), (16, 16, true), (32, 16, false), (32, 16, true), (16, 8, true)]
        {
            let x = crate::testing::seeded_randn(500, 0.0, 1.0, &[b, t, h * d]);
            let coef = crate::testing::seeded_randn(501, 0.0, 1.0, &[b, h, t, d]);
            let angles = crate::testing::seeded_randn(502, 0.0, 2.0, &[t, rot / 2]);
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let heads = |x: &Tensor| x.reshape((b, t, h, d))?.transpose(1, 2);
            let run = |dev: &Device, dtype: DType, strided: bool| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
                let (c, s) = (cos.to_dtype(dtype)?.to_device(dev)?, sin.to_dtype(dtype)?.to_device(dev)?);
                let xh = heads(v.as_tensor())?;
                let y = if strided {
                    rope_heads(&xh, &c, &s, rot, interleaved)?.expect("a CUDA tensor")
                } else {
                    let r = rope(&xh.narrow(3, 0, rot)?, &c, &s, interleaved)?;
                    Tensor::cat(&[&r, &xh.narrow(3, rot, d - rot)?], 3)?
                };
                let loss = (y.to_dtype(DType::F32)? * coef.to_device(dev)?)?.sum_all()?;
                let g = loss.backward()?.get(v.as_tensor()).expect("a gradient").clone();
                let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
                Ok((cpu(y)?, cpu(g)?))
            };
            let (want_y, want_g) = run(&Device::Cpu, DType::F32, false)?;
            for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 3e-2), (DType::F16, 1e-2)] {
                let (y, g) = run(&gpu, dtype, true)?;
                let dy = (y - &want_y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let dg = (g - &want_g)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(dy < tol && dg < tol, "d {d}, rot {rot}, interleaved {interleaved}, {dtype:?}: {dy} / {dg}");
            }
        }
        Ok(())
    }

    /// Gradient of `sum(f(x) · coef)` for each implementation; both must agree.
    fn grads(f: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> f32 {
        let coef = crate::testing::seeded_randn(201, 0.0, 1.0, f(x).dims());
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

    /// Values and the gradients of every variable agree between our op and the plain composition.
    fn check_all(ours: &Tensor, plain: &Tensor, vars: &[&Var], what: &str) {
        let dv = (ours - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(dv < 1e-5, "{what}: values differ by {dv}");
        let coef = crate::testing::seeded_randn(202, 0.0, 1.0, ours.dims());
        let g1 = (ours * &coef).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &coef).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(!a.track_op(), "{what}: gradients carry no graph");
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{what}: gradient of input {i} off by {d}");
        }
    }

    /// The CPU's tiled attention (no score matrix) against candle's primitive ops (and their backward passes)
    /// and against the tensor-op attention, values and the gradients of q, k and v: blocks of query rows off and on the block size, keys cached before the new tokens, one and three
    /// query heads per KV head, a single new token (no mask), head dims 16 and 64.
    #[test]
    fn tiled_attention_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        for (case, &(b, kv, groups, t, total, d)) in
            [(2, 2, 3, 37, 37, 16), (1, 3, 1, 70, 75, 64), (2, 1, 2, 1, 9, 64), (1, 2, 2, 32, 32, 16)]
                .iter()
                .enumerate()
        {
            let seed = 300 + 10 * case as u64;
            let var = |s: u64, shape: &[usize]| Var::from_tensor(&crate::testing::seeded_randn(s, 0.0, 1.0, shape));
            let q = var(seed, &[b, kv, groups * t, d]).unwrap();
            let k = var(seed + 1, &[b, kv, total, d]).unwrap();
            let v = var(seed + 2, &[b, kv, total, d]).unwrap();
            let mask = (t > 1).then(|| crate::ops::fused::causal_mask(t, total - t, DType::F32, &dev).unwrap());
            let scale = 1.0 / (d as f64).sqrt();
            let args = (q.as_tensor(), k.as_tensor(), v.as_tensor(), groups, scale);
            let tiled = tiled_cpu_attention(args.0, args.1, args.2, args.3, args.4).unwrap();
            let tiled = tiled.expect("these shapes take the tiled path");
            // candle's own ops and their backward passes: softmax(q kᵀ · scale + mask) v.
            let s = (q.as_tensor() * scale).unwrap().matmul(&k.as_tensor().t().unwrap()).unwrap();
            let s = match &mask {
                Some(m) => s.reshape((b, kv, groups, t, total)).unwrap().broadcast_add(m).unwrap(),
                None => s,
            };
            let s = s.reshape((b, kv, groups * t, total)).unwrap();
            let plain = candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(v.as_tensor()).unwrap();
            let plain = plain.reshape((b, kv * groups, t, d)).unwrap().transpose(1, 2).unwrap();
            let plain = plain.reshape((b, t, kv * groups * d)).unwrap();
            check_all(&tiled, &plain, &[&q, &k, &v], &format!("tiled attention, case {case}"));
            let ops = tensor_attention(args.0, args.1, args.2, args.3, args.4).unwrap();
            check_all(&tiled, &ops, &[&q, &k, &v], &format!("tiled against tensor-op attention, case {case}"));
        }
        // A diverging input shows in the output as NaN (as through the tensor ops), not as zeros.
        let q = crate::testing::seeded_randn(390, 0.0, 1.0, &[1, 1, 4, 16]);
        let q = q.slice_assign(&[0..1, 0..1, 2..3, 0..1], &Tensor::new(&[[[[f32::NAN]]]], &dev).unwrap()).unwrap();
        let kv = crate::testing::seeded_randn(391, 0.0, 1.0, &[1, 1, 4, 16]);
        let out = tiled_cpu_attention(&q, &kv, &kv, 1, 0.25).unwrap().expect("tiled");
        let nan = out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|x| x.is_nan()).count();
        assert_eq!(nan, 16, "the row whose query is NaN is NaN, the others are not");
    }

    /// The CUDA training attention (tensor-core kernels, bf16) against the CPU's f32 attention on the same
    /// bf16-rounded inputs, values and the gradients of q, k and v, relative to each one's largest magnitude:
    /// tiles partly filled, keys cached before the new tokens, groups of 1, 4 and 3, head dims 64 and 128.
    #[test]
    fn tiled_cuda_attention_matches_the_cpu() {
        let Some(gpu) = crate::testing::cuda_device() else { return };
        for (case, &(b, kv, groups, t, total, d)) in
            [(2, 2, 4, 100, 100, 64), (1, 3, 1, 70, 75, 64), (2, 1, 3, 1, 9, 128), (1, 2, 2, 65, 65, 128)]
                .iter()
                .enumerate()
        {
            let seed = 400 + 10 * case as u64;
            let scale = 1.0 / (d as f64).sqrt();
            let rounded = |s: u64, shape: &[usize]| {
                crate::testing::seeded_randn(s, 0.0, 1.0, shape).to_dtype(DType::BF16).unwrap()
            };
            let inputs = [
                rounded(seed, &[b, kv, groups * t, d]),
                rounded(seed + 1, &[b, kv, total, d]),
                rounded(seed + 2, &[b, kv, total, d]),
            ];
            let coef = crate::testing::seeded_randn(seed + 3, 0.0, 1.0, &[b, t, kv * groups * d]);
            let run = |device: &Device, dtype: DType| {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dtype)?.to_device(device)?))
                    .collect::<Result<_>>()?;
                let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
                let out = attention(q, k, v, groups, scale)?;
                let loss = (out.to_dtype(DType::F32)? * coef.to_device(device)?)?.sum_all()?;
                let grads = loss.backward()?;
                let mut all = vec![out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?];
                for x in [q, k, v] {
                    all.push(grads.get(x).expect("a gradient").to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
                }
                Ok::<_, candle_core::Error>(all)
            };
            let want = run(&Device::Cpu, DType::F32).unwrap();
            let got = run(&gpu, DType::BF16).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let size = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let diff = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let what = ["output", "dq", "dk", "dv"][i];
                assert!(diff <= 2e-2 * size, "case {case}: {what} off by {diff} (largest {size})");
            }
        }
    }

    /// The CUDA loss kernel against log_softmax, gather and softmax − onehot on the CPU in f32, on the same
    /// bf16 logits: rows of a vocabulary wider than a block, targets at both ends.
    #[test]
    fn fused_cross_entropy_matches_the_composition() {
        let Some(gpu) = crate::testing::cuda_device() else { return };
        // 1,000 logits a row take the kernel's 8-wide loads, 1,001 its one-at-a-time loop.
        for (rows, n) in [(5, 1000), (5, 1001)] {
            let logits = (crate::testing::seeded_randn(420, 0.0, 3.0, &[rows, n]).to_dtype(DType::BF16)).unwrap();
            let targets = Tensor::new(&[0u32, 999, 17, 500, 3], &Device::Cpu).unwrap();
            let off = |a: &Tensor, b: &Tensor| {
                let a = a.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
                (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            };
            let (logits_gpu, targets_gpu) = (logits.to_device(&gpu).unwrap(), targets.to_device(&gpu).unwrap());
            let (loss, d) = fused_cross_entropy(&logits_gpu, &targets_gpu, true).unwrap().expect("bf16 on CUDA");
            let d = d.expect("a gradient when asked for");
            let (eval_loss, none) =
                fused_cross_entropy(&logits_gpu, &targets_gpu, false).unwrap().expect("bf16 on CUDA");
            assert!(none.is_none(), "no gradient when none is asked for");
            assert!(
                off(&eval_loss, &loss.to_device(&Device::Cpu).unwrap()) == 0.0,
                "the same loss without the gradient"
            );
            let x = logits.to_dtype(DType::F32).unwrap();
            let logp = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
            let want_loss = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap();
            let onehot = Tensor::zeros((rows, n), DType::F32, &Device::Cpu)
                .unwrap()
                .scatter_add(
                    &targets.unsqueeze(1).unwrap(),
                    &Tensor::ones((rows, 1), DType::F32, &Device::Cpu).unwrap(),
                    1,
                )
                .unwrap();
            let want_d = (logp.exp().unwrap() - onehot).unwrap();
            assert!(off(&loss, &want_loss) < 1e-3, "loss off by {}", off(&loss, &want_loss));
            assert!(off(&d, &want_d) < 4e-3, "gradient off by {}", off(&d, &want_d));
        }
    }

    /// The heads relayout on CUDA (one kernel each way) against a plain contiguous copy on the CPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn heads_contiguous_on_cuda_matches_a_copy() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let (b, t, h, d) = (2usize, 5usize, 3usize, 8usize);
        // bf16 values, so that the bf16 relayout (the 16-byte kernel) is exact too.
        let rounded = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let x = rounded(crate::testing::seeded_randn(440, 0.0, 1.0, &[b, t, h * d]))?;
        let coef = rounded(crate::testing::seeded_randn(441, 0.0, 1.0, &[b, h, t, d]))?;
        let run = |dev: &Device, dtype: DType, ours: bool| -> Result<(Tensor, Tensor)> {
            let v = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
            let heads = v.as_tensor().reshape((b, t, h, d))?.transpose(1, 2)?;
            let y = if ours { heads_contiguous(&heads)? } else { heads.contiguous()? };
            assert!(y.is_contiguous());
            let loss = (y.to_dtype(DType::F32)? * coef.to_device(dev)?)?.sum_all()?;
            let g = loss.backward()?.get(v.as_tensor()).expect("a gradient").clone();
            let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
            Ok((cpu(y)?, cpu(g)?))
        };
        let (want_y, want_g) = run(&Device::Cpu, DType::F32, false)?;
        for dtype in [DType::F32, DType::BF16] {
            let (y, g) = run(&gpu, dtype, true)?;
            let dy = (y - &want_y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let dg = (g - &want_g)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(dy == 0.0 && dg == 0.0, "{dtype:?}: {dy} / {dg}");
        }
        Ok(())
    }

    /// The row selection's gradient on CUDA (one kernel's scatter) against candle's index_add on the CPU, with
    /// distinct rows and with a repeated one (whose gradients add).
    #[cfg(feature = "cuda")]
    #[test]
    fn select_rows_gradient_on_cuda_matches_index_add() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let x = crate::testing::seeded_randn(430, 0.0, 1.0, &[9, 6]);
        let coef = crate::testing::seeded_randn(431, 0.0, 1.0, &[4, 6]);
        for rows in [[7u32, 0, 3, 8], [2, 5, 2, 1]] {
            let run = |dev: &Device, dtype: DType| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
                let y = select_rows(v.as_tensor(), &Tensor::new(&rows, dev)?)?;
                let loss = (y.to_dtype(DType::F32)? * coef.to_device(dev)?)?.sum_all()?;
                let g = loss.backward()?.get(v.as_tensor()).expect("a gradient").clone();
                Ok((y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
            };
            let (want_y, want_g) = run(&Device::Cpu, DType::F32)?;
            for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 2e-2)] {
                let (y, g) = run(&gpu, dtype)?;
                let dy = (y - &want_y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let dg = (g - &want_g)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(dy < tol && dg < tol, "rows {rows:?}, {dtype:?}: {dy} / {dg}");
            }
        }
        Ok(())
    }

    #[test]
    fn backward_passes_match_primitive_compositions() {
        let dev = Device::Cpu;
        let x = crate::testing::seeded_randn(203, 0.0, 1.0, &[2, 5, 16]);
        let w = crate::testing::seeded_randn(204, 1.0, 0.2, &[16]);
        let b = crate::testing::seeded_randn(205, 0.0, 0.2, &[16]);
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

        let q = crate::testing::seeded_randn(206, 0.0, 1.0, &[1, 2, 5, 8]);
        let cos = crate::testing::seeded_randn(207, 0.0, 1.0, &[5, 4]);
        let sin = crate::testing::seeded_randn(208, 0.0, 1.0, &[5, 4]);
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

        // Attention over 2 kv heads × 2 groups, t = 3, against the primitive composition, for q, k and v.
        let q = Var::from_tensor(&crate::testing::seeded_randn(209, 0.0, 1.0, &[1, 2, 6, 8])).unwrap();
        let k = Var::from_tensor(&crate::testing::seeded_randn(210, 0.0, 1.0, &[1, 2, 3, 8])).unwrap();
        let v = Var::from_tensor(&crate::testing::seeded_randn(211, 0.0, 1.0, &[1, 2, 3, 8])).unwrap();
        let mask = crate::ops::fused::causal_mask(3, 0, DType::F32, &dev).unwrap();
        let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 2, 0.5).unwrap();
        let s = (q.as_tensor() * 0.5).unwrap().matmul(&k.as_tensor().t().unwrap()).unwrap();
        let s = s.reshape((1, 2, 2, 3, 3)).unwrap().broadcast_add(&mask).unwrap().reshape((1, 2, 6, 3)).unwrap();
        let plain = candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(v.as_tensor()).unwrap();
        let plain = plain.reshape((1, 4, 3, 8)).unwrap().transpose(1, 2).unwrap().reshape((1, 3, 32)).unwrap();
        check_all(&ours, &plain, &[&q, &k, &v], "attention");

        let sw_g = Var::from_tensor(&crate::testing::seeded_randn(212, 0.0, 2.0, &[3, 7])).unwrap();
        let sw_u = Var::from_tensor(&crate::testing::seeded_randn(213, 0.0, 1.0, &[3, 7])).unwrap();
        let ours = swiglu(sw_g.as_tensor(), sw_u.as_tensor()).unwrap();
        let plain = (candle_nn::ops::silu(sw_g.as_tensor()).unwrap() * sw_u.as_tensor()).unwrap();
        check_all(&ours, &plain, &[&sw_g, &sw_u], "swiglu");

        let logits = Var::from_tensor(&crate::testing::seeded_randn(214, 0.0, 3.0, &[6, 11])).unwrap();
        let rows = Tensor::new(&[0u32, 2, 3, 5], &dev).unwrap();
        let t = Tensor::new(&[3u32, 0, 10, 3], &dev).unwrap();
        let ours = cross_entropy_rows(logits.as_tensor(), &rows, &t).unwrap();
        let picked = logits.as_tensor().index_select(&rows, 0).unwrap();
        let lp = candle_nn::ops::log_softmax(&picked, D::Minus1).unwrap();
        let plain = lp.gather(&t.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap();
        check_all(&ours, &plain, &[&logits], "cross-entropy");
    }

    /// The fused head + loss against the head's logits through `cross_entropy_rows`, with more rows than one
    /// chunk holds (a vocabulary of 300k makes chunks of 27 rows: 64 rows take three).
    #[test]
    fn head_cross_entropy_matches_logits_then_loss() {
        let (n, hidden, vocab) = (64, 6, 300_000);
        let w = crate::testing::seeded_randn(215, 0.0, 0.5, &[vocab, hidden]);
        let x = Var::from_tensor(&crate::testing::seeded_randn(216, 0.0, 1.0, &[n, hidden])).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 4_099 + 17) % vocab as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let head = |x: &Tensor| x.matmul(&w.t()?);
        let fused = head_cross_entropy(x.as_tensor(), &targets, vocab, head, |_, d: &Tensor| d.matmul(&w)).unwrap();
        let rows = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap();
        let plain = cross_entropy_rows(&head(x.as_tensor()).unwrap(), &rows, &targets).unwrap();
        check_all(&fused, &plain, &[&x], "head cross-entropy");
        let untracked = head_cross_entropy(&x.as_tensor().detach(), &targets, vocab, head, |_, _| unreachable!());
        assert!(!untracked.unwrap().track_op(), "no gradient is prepared for an input that needs none");
    }
}

//! Training's element-wise and per-row steps as single ops (a loop on the CPU, one kernel on CUDA) instead of a
//! handful to a dozen candle ops each: RMSNorm's and LayerNorm's input gradients, SwiGLU's two gradients, and the adapters'
//! dropout (a seeded mask, widened to f32). Each is checked against the composition of candle ops it replaces, and on a
//! GPU the kernels against the CPU loops.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

/// The input gradient of RMSNorm `y = x / rms(x) · w` (weights frozen): `x`, `g` `[.., cols]`, `w` `[cols]`,
/// all of one float dtype; computed in f32, returned in that dtype.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    x.apply_op3_no_bwd(&w.contiguous()?, &g, &NormBackward { eps: eps as f32, centered: false })
}

/// The input gradient of LayerNorm `y = (x − mean) / std · w + b` (weights and bias frozen), as
/// [`rms_norm_backward`] takes its arguments.
pub fn layer_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    x.apply_op3_no_bwd(&w.contiguous()?, &g, &NormBackward { eps: eps as f32, centered: true })
}

/// SwiGLU `silu(gate) · up`'s gradients `(d gate, d up)` for the output gradient `g` (all of one shape and
/// float dtype), computed in f32.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate, up, g) = (gate.contiguous()?, up.contiguous()?, g.contiguous()?);
    let n = gate.elem_count();
    let both = gate.apply_op3_no_bwd(&up, &g, &SwiGluBackward)?;
    Ok((both.narrow(0, 0, n)?.reshape(gate.shape())?, both.narrow(0, n, n)?.reshape(gate.shape())?))
}

/// `x ⊙ mask` in f32 (`x` f32, bf16 or f16): the adapters' dropout, and the same mask on its gradient. The
/// mask is no tensor: element `i` is kept when `dropout_keeps(seed, i, ·)`, on the CPU and in the kernel alike,
/// so a layer run again (activation checkpointing) or a backward pass needs only the seed.
pub fn dropout_f32(x: &Tensor, seed: u64, p: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&DropoutF32 { seed, threshold: drop_threshold(p) })
}

/// `p` as the 16-bit threshold `dropout_keeps` compares with (2¹⁶ for p = 1: nothing kept).
pub(crate) fn drop_threshold(p: f32) -> u32 {
    (p.clamp(0.0, 1.0) as f64 * (1u64 << 16) as f64).round() as u32
}

/// splitmix64's output for step `i + 1` of the sequence seeded `seed`.
fn splitmix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Does element `i` of the dropout mask seeded `seed` keep its value? Its 16 bits of the hash of `i / 4`
/// (bits `16 · (i mod 4)` up), a uniform draw in [0, 2¹⁶), against `threshold` (`p · 2¹⁶`): one hash serves
/// four elements, which the GPU kernels that re-derive masks as they load feel (a 64-bit hash is ~30
/// instructions there).
fn dropout_keeps(seed: u64, i: u64, threshold: u32) -> bool {
    ((splitmix(seed, i / 4) >> (16 * (i % 4))) & 0xFFFF) as u32 >= threshold
}

struct DropoutF32 {
    seed: u64,
    threshold: u32,
}

impl candle_core::CustomOp1 for DropoutF32 {
    fn name(&self) -> &'static str {
        "dropout-f32"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(x: &[T], seed: u64, threshold: u32) -> Vec<f32> {
            let keep = |i: usize, v: T| if dropout_keeps(seed, i as u64, threshold) { v.to_f64() as f32 } else { 0.0 };
            x.iter().enumerate().map(|(i, &v)| keep(i, v)).collect()
        }
        let (name, seed, th) = (self.name(), self.seed, self.threshold);
        let out = match x {
            CpuStorage::F32(x) => run(contiguous(x, xl, name)?, seed, th),
            CpuStorage::BF16(x) => run(contiguous(x, xl, name)?, seed, th),
            CpuStorage::F16(x) => run(contiguous(x, xl, name)?, seed, th),
            _ => candle_core::bail!("dropout-f32: unsupported dtype"),
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::dropout_f32(x, xl, self.seed, self.threshold)?, xl.shape().clone()))
    }
}

/// RMSNorm's (`centered` false) or LayerNorm's input gradient.
struct NormBackward {
    eps: f32,
    centered: bool,
}

impl NormBackward {
    /// The row width: `w`'s length, `x`'s last dim, `g` of `x`'s shape.
    fn row_width(&self, xl: &Layout, wl: &Layout, gl: &Layout) -> Result<usize> {
        let cols = wl.shape().elem_count();
        if cols == 0 || xl.shape().dims().last() != Some(&cols) || xl.shape() != gl.shape() {
            let name = candle_core::CustomOp3::name(self);
            candle_core::bail!("{name}: x {:?}, w {:?}, g {:?}", xl.dims(), wl.dims(), gl.dims());
        }
        Ok(cols)
    }

    /// One row's input gradient. With `c = x − mean` (LayerNorm) or `c = x` (RMSNorm) and `rstd = 1 /
    /// √(Σc²/cols + eps)`: `dx = rstd · (g·w − [Σ(g·w)/cols] − c · rstd² · Σ(g·w·c)/cols)`, the bracketed
    /// term LayerNorm's only.
    fn row<T: WithDType>(&self, x: &[T], w: &[T], g: &[T], dx: &mut [T]) {
        let f = |v: T| v.to_f64() as f32;
        let cols = x.len() as f32;
        let mean = if self.centered { x.iter().map(|v| f(*v)).sum::<f32>() / cols } else { 0.0 };
        let (mut var, mut sg, mut sgc) = (0f32, 0f32, 0f32);
        for ((x, w), g) in x.iter().zip(w).zip(g) {
            let (c, gw) = (f(*x) - mean, f(*g) * f(*w));
            var += c * c;
            sg += gw;
            sgc += gw * c;
        }
        let rstd = 1.0 / (var / cols + self.eps).sqrt();
        let mean_gw = if self.centered { sg / cols } else { 0.0 };
        let k = rstd * rstd * sgc / cols;
        for (((d, x), w), g) in dx.iter_mut().zip(x).zip(w).zip(g) {
            *d = T::from_f64((rstd * (f(*g) * f(*w) - mean_gw - (f(*x) - mean) * k)) as f64);
        }
    }
}

struct SwiGluBackward;

/// SwiGLU's gate, up and output gradient all of one shape.
fn same_shapes(xl: &Layout, ul: &Layout, gl: &Layout) -> Result<()> {
    if xl.shape() != ul.shape() || xl.shape() != gl.shape() {
        candle_core::bail!("swiglu-backward: gate {:?}, up {:?}, g {:?}", xl.dims(), ul.dims(), gl.dims());
    }
    Ok(())
}

/// `(d gate, d up)` of one element: `silu'(x) = σ(x)(1 + x(1 − σ(x)))`.
fn swiglu_grads(x: f32, up: f32, g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-x).exp());
    (g * up * (s * (1.0 + x * (1.0 - s))), g * (x * s))
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input not contiguous"),
    }
}

/// `$run(a, b, c, extra..)` (a generic fn returning `Vec<T>`) over three CPU inputs of one float dtype (f32,
/// bf16 or f16), each as its contiguous slice; the result in that dtype's storage.
macro_rules! three_same_dtype {
    ($name:expr, $run:ident, ($a:expr, $al:expr), ($b:expr, $bl:expr), ($c:expr, $cl:expr) $(, $extra:expr)*) => {
        match ($a, $b, $c) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32($run(
                contiguous(a, $al, $name)?, contiguous(b, $bl, $name)?, contiguous(c, $cl, $name)? $(, $extra)*)),
            (CpuStorage::BF16(a), CpuStorage::BF16(b), CpuStorage::BF16(c)) => CpuStorage::BF16($run(
                contiguous(a, $al, $name)?, contiguous(b, $bl, $name)?, contiguous(c, $cl, $name)? $(, $extra)*)),
            (CpuStorage::F16(a), CpuStorage::F16(b), CpuStorage::F16(c)) => CpuStorage::F16($run(
                contiguous(a, $al, $name)?, contiguous(b, $bl, $name)?, contiguous(c, $cl, $name)? $(, $extra)*)),
            _ => candle_core::bail!("{}: unsupported or mismatched dtypes", $name),
        }
    };
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        if self.centered {
            "layer-norm-backward"
        } else {
            "rms-norm-backward"
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = self.row_width(xl, wl, gl)?;
        fn run<T: WithDType>(x: &[T], w: &[T], g: &[T], op: &NormBackward, cols: usize) -> Vec<T> {
            let mut dx = vec![T::zero(); x.len()];
            for ((dx, x), g) in dx.chunks_mut(cols).zip(x.chunks(cols)).zip(g.chunks(cols)) {
                op.row(x, w, g, dx);
            }
            dx
        }
        let out = three_same_dtype!(self.name(), run, (x, xl), (w, wl), (g, gl), self, cols);
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = self.row_width(xl, wl, gl)?;
        let rows = xl.shape().elem_count() / cols;
        let args = cuda::Args { count: rows as i64, cols: cols as i32, eps: self.eps };
        let kernel = if self.centered { "layer_norm_backward" } else { "rms_norm_backward" };
        let out = cuda::three_in(x, xl, w, wl, g, gl, kernel, xl.shape().elem_count(), (rows, 1), &args)?;
        Ok((out, xl.shape().clone()))
    }
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shapes(xl, ul, gl)?;
        fn run<T: WithDType>(x: &[T], u: &[T], g: &[T]) -> Vec<T> {
            let n = x.len();
            let mut out = vec![T::zero(); 2 * n];
            let (dgate, dup) = out.split_at_mut(n);
            for i in 0..n {
                let f = |v: T| v.to_f64() as f32;
                let (a, b) = swiglu_grads(f(x[i]), f(u[i]), f(g[i]));
                dgate[i] = T::from_f64(a as f64);
                dup[i] = T::from_f64(b as f64);
            }
            out
        }
        let out = three_same_dtype!(self.name(), run, (x, xl), (u, ul), (g, gl));
        Ok((out, Shape::from(2 * xl.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shapes(xl, ul, gl)?;
        let n = xl.shape().elem_count();
        let args = cuda::Args { count: n as i64, cols: 0, eps: 0.0 };
        // The kernel takes 8 inputs (16 outputs) a thread where it can.
        let out = cuda::three_in(x, xl, u, ul, g, gl, "swiglu_backward", 2 * n, (0, 16), &args)?;
        Ok((out, Shape::from(2 * n)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::ops::fused::cuda::{grid_for_warps, grid_stride, kernel, suffix};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
    use candle_core::{Layout, Result};
    use half::{bf16, f16};

    /// `dropout_f32_{dtype}(x, out, n, seed, threshold)`.
    pub fn dropout_f32(x: &CudaStorage, xl: &Layout, seed: u64, threshold: u32) -> Result<CudaStorage> {
        let dev = x.device.clone();
        let bad = || candle_core::Error::Msg("dropout-f32: input not contiguous".into());
        let (x1, x2) = xl.contiguous_offsets().ok_or_else(bad)?;
        let n = x2 - x1;
        let f = kernel(&dev, &format!("dropout_f32_{}", suffix(x.dtype())?))?;
        let stream = dev.cuda_stream();
        let cfg = grid_stride(n);
        let n64 = n as i64;
        // SAFETY: the kernel writes every element of `out`.
        let out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n)? };
        macro_rules! run {
            ($x:expr) => {{
                let xv = $x.slice(x1..x2);
                let mut b = stream.launch_builder(&f);
                b.arg(&xv).arg(&out).arg(&n64).arg(&seed).arg(&threshold);
                // SAFETY: n elements of x and out; the argument types are the kernel's.
                unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            }};
        }
        match &x.slice {
            CudaStorageSlice::F32(v) => run!(v),
            CudaStorageSlice::BF16(v) => run!(v),
            CudaStorageSlice::F16(v) => run!(v),
            _ => candle_core::bail!("dropout-f32: unsupported dtype"),
        }
        Ok(CudaStorage { slice: CudaStorageSlice::F32(out), device: dev })
    }

    /// The scalar arguments after the buffers: a count (rows, or elements), a row width and an epsilon.
    pub struct Args {
        pub count: i64,
        pub cols: i32,
        pub eps: f32,
    }

    /// `name_{dtype}(a, b, c, out, count, cols, eps)` over contiguous inputs of one dtype, `out` of `n`
    /// elements: with `rows > 0` one warp per row (8 per block), else a grid-stride loop of threads that take
    /// `per_thread` outputs each.
    #[allow(clippy::too_many_arguments)]
    pub fn three_in(
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
        name: &str,
        n: usize,
        (rows, per_thread): (usize, usize),
        args: &Args,
    ) -> Result<CudaStorage> {
        let dev = a.device.clone();
        let bad = || candle_core::Error::Msg(format!("{name}: inputs not contiguous"));
        let (a1, a2) = al.contiguous_offsets().ok_or_else(bad)?;
        let (b1, b2) = bl.contiguous_offsets().ok_or_else(bad)?;
        let (c1, c2) = cl.contiguous_offsets().ok_or_else(bad)?;
        let f = kernel(&dev, &format!("{name}_{}", suffix(a.dtype())?))?;
        let stream = dev.cuda_stream();
        let cfg = if rows > 0 { grid_for_warps(rows) } else { grid_stride(n.div_ceil(per_thread.max(1))) };
        macro_rules! run {
            ($t:ty, $a:expr, $b:expr, $c:expr, $variant:ident) => {{
                let (av, bv, cv) = ($a.slice(a1..a2), $b.slice(b1..b2), $c.slice(c1..c2));
                // SAFETY: the kernel writes every element of `out`.
                let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n)? };
                let mut builder = stream.launch_builder(&f);
                builder.arg(&av).arg(&bv).arg(&cv).arg(&out).arg(&args.count).arg(&args.cols).arg(&args.eps);
                // SAFETY: argument types and counts are the kernel's; every index stays inside these slices.
                unsafe { builder.launch(cfg) }.map_err(candle_core::Error::wrap)?;
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        Ok(match (&a.slice, &b.slice, &c.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(y), CudaStorageSlice::F32(z)) => run!(f32, x, y, z, F32),
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(z)) => {
                run!(bf16, x, y, z, BF16)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(y), CudaStorageSlice::F16(z)) => run!(f16, x, y, z, F16),
            _ => candle_core::bail!("{name}: unsupported or mismatched dtypes"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::seeded_randn;
    use candle_core::DType;
    use candle_core::D;

    /// Widened to f32 for comparisons.
    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The composed RMSNorm backward `ops::autograd::rms_norm` used before this op (f32 throughout).
    fn rms_reference(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Tensor {
        let rstd = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
        let xhat = x.broadcast_mul(&rstd).unwrap();
        let gw = g.broadcast_mul(w).unwrap();
        let proj = (&gw * &xhat).unwrap().mean_keepdim(D::Minus1).unwrap();
        gw.broadcast_sub(&xhat.broadcast_mul(&proj).unwrap()).unwrap().broadcast_mul(&rstd).unwrap()
    }

    /// The composed LayerNorm backward `ops::autograd::layer_norm` used before this op.
    fn layer_reference(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Tensor {
        let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let rstd = (c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
        let xhat = c.broadcast_mul(&rstd).unwrap();
        let gw = g.broadcast_mul(w).unwrap();
        let mean_gw = gw.mean_keepdim(D::Minus1).unwrap();
        let proj = (&gw * &xhat).unwrap().mean_keepdim(D::Minus1).unwrap();
        let d = gw.broadcast_sub(&mean_gw).unwrap().broadcast_sub(&xhat.broadcast_mul(&proj).unwrap()).unwrap();
        d.broadcast_mul(&rstd).unwrap()
    }

    fn swiglu_reference(x: &Tensor, up: &Tensor, g: &Tensor) -> (Tensor, Tensor) {
        let sig = candle_nn::ops::sigmoid(x).unwrap();
        let d = (&sig * ((x * (1.0 - &sig).unwrap()).unwrap() + 1.0).unwrap()).unwrap();
        (((g * up).unwrap() * d).unwrap(), (g * (x * &sig).unwrap()).unwrap())
    }

    /// Largest difference relative to the largest reference value.
    fn off(got: &Tensor, want: &Tensor) -> f32 {
        let (a, b) = (f32s(got), f32s(want));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn single_ops_equal_the_compositions() {
        let x = seeded_randn(501, 0.3, 1.5, &[3, 5, 40]);
        let w = seeded_randn(502, 1.0, 0.2, &[40]);
        let g = seeded_randn(503, 0.0, 1.0, &[3, 5, 40]);
        let d = off(&rms_norm_backward(&x, &w, &g, 1e-5).unwrap(), &rms_reference(&x, &w, &g, 1e-5));
        assert!(d < 1e-5, "rms-norm backward off by {d}");
        let d = off(&layer_norm_backward(&x, &w, &g, 1e-5).unwrap(), &layer_reference(&x, &w, &g, 1e-5));
        assert!(d < 1e-5, "layer-norm backward off by {d}");
        let up = seeded_randn(504, 0.0, 1.0, &[3, 5, 40]);
        let (dg, du) = swiglu_backward(&x, &up, &g).unwrap();
        let (wg, wu) = swiglu_reference(&x, &up, &g);
        assert_eq!(dg.dims(), x.dims());
        let (a, b) = (off(&dg, &wg), off(&du, &wu));
        assert!(a < 1e-5 && b < 1e-5, "swiglu backward off by {a} (gate), {b} (up)");
        // Half precision: the same values from inputs rounded to bf16, within bf16's rounding of the result.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (xb, wb, gb, ub) = (bf(&x), bf(&w), bf(&g), bf(&up));
        let up32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = rms_reference(&up32(&xb), &up32(&wb), &up32(&gb), 1e-5);
        let d = off(&rms_norm_backward(&xb, &wb, &gb, 1e-5).unwrap(), &want);
        assert!(d < 1e-2, "bf16 rms-norm backward off by {d}");
        let (wg, _) = swiglu_reference(&up32(&xb), &up32(&ub), &up32(&gb));
        let d = off(&swiglu_backward(&xb, &ub, &gb).unwrap().0, &wg);
        assert!(d < 1e-2, "bf16 swiglu backward off by {d}");
        // Dropout: the values kept are the input's, the share dropped is p, a seed gives one mask.
        for t in [&x, &xb] {
            let dropped = f32s(&dropout_f32(t, 7, 0.3).unwrap());
            assert_eq!(dropped, f32s(&dropout_f32(t, 7, 0.3).unwrap()), "one seed, one mask");
            let x32 = f32s(t);
            assert!(dropped.iter().zip(&x32).all(|(d, x)| *d == 0.0 || d == x), "kept values are the input's");
            assert_ne!(dropped, f32s(&dropout_f32(t, 8, 0.3).unwrap()), "another seed, another mask");
        }
        let th = drop_threshold(0.3);
        let dropped = (0..200_000u64).filter(|&i| !dropout_keeps(11, i, th)).count() as f64 / 200_000.0;
        assert!((dropped - 0.3).abs() < 0.005, "{dropped} of the elements dropped, 0.3 asked for");
        assert!((0..1000u64).all(|i| dropout_keeps(11, i, drop_threshold(0.0))), "p = 0 drops nothing");
    }

    /// The kernels against the CPU loops, where a GPU is present.
    #[cfg(feature = "cuda")]
    #[test]
    fn kernels_equal_the_cpu_loops() {
        let Some(gpu) = crate::testing::cuda_device() else { return };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let t = |seed, mean, std, shape: &[usize]| seeded_randn(seed, mean, std, shape).to_dtype(dtype).unwrap();
            let (x, w, g, up) = (
                t(511, 0.3, 1.5, &[7, 2048]),
                t(512, 1.0, 0.2, &[2048]),
                t(513, 0.0, 1.0, &[7, 2048]),
                t(514, 0.0, 1.0, &[7, 2048]),
            );
            let on = |t: &Tensor| t.to_device(&gpu).unwrap();
            let want = rms_norm_backward(&x, &w, &g, 1e-5).unwrap();
            let d = off(&rms_norm_backward(&on(&x), &on(&w), &on(&g), 1e-5).unwrap(), &want);
            assert!(d < tol, "{dtype:?} rms-norm backward kernel off by {d}");
            let want = layer_norm_backward(&x, &w, &g, 1e-5).unwrap();
            let d = off(&layer_norm_backward(&on(&x), &on(&w), &on(&g), 1e-5).unwrap(), &want);
            assert!(d < tol, "{dtype:?} layer-norm backward kernel off by {d}");
            let (wg, wu) = swiglu_backward(&x, &up, &g).unwrap();
            let (dg, du) = swiglu_backward(&on(&x), &on(&up), &on(&g)).unwrap();
            let (a, b) = (off(&dg, &wg), off(&du, &wu));
            assert!(a < tol && b < tol, "{dtype:?} swiglu backward kernel off by {a} (gate), {b} (up)");
            let want = f32s(&dropout_f32(&x, 1234, 0.3).unwrap());
            assert_eq!(f32s(&dropout_f32(&on(&x), 1234, 0.3).unwrap()), want, "{dtype:?} dropout: the CPU's mask");
            // 21 values: the kernel's one-value loop (the 8-wide one needs a multiple of 8), on a grid sized for
            // the 8-wide one.
            let (x, up, g) = (t(515, 0.3, 1.5, &[3, 7]), t(516, 0.0, 1.0, &[3, 7]), t(517, 0.0, 1.0, &[3, 7]));
            let (wg, wu) = swiglu_backward(&x, &up, &g).unwrap();
            let (dg, du) = swiglu_backward(&on(&x), &on(&up), &on(&g)).unwrap();
            let (a, b) = (off(&dg, &wg), off(&du, &wu));
            assert!(a < tol && b < tol, "{dtype:?} swiglu backward, 21 values: off by {a} (gate), {b} (up)");
            let want = crate::ops::fused::swiglu(&x, &up).unwrap();
            let d = off(&crate::ops::fused::swiglu(&on(&x), &on(&up)).unwrap(), &want);
            assert!(d < tol, "{dtype:?} swiglu, 21 values: off by {d}");
        }
    }

    /// The 16-byte gradient addition equals candle's addition, and declines what it cannot take (a view that
    /// starts off a 16-byte boundary, sizes that are not whole vectors, mixed dtypes).
    #[cfg(feature = "cuda")]
    #[test]
    fn grad_add_equals_candles_addition() {
        use crate::ops::fused::cuda::add_same;
        let Some(gpu) = crate::testing::cuda_device() else { return };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = |seed, shape: &[usize]| {
                seeded_randn(seed, 0.0, 1.0, shape).to_dtype(dtype).unwrap().to_device(&gpu).unwrap()
            };
            let (a, b) = (t(520, &[5, 64]), t(521, &[5, 64]));
            let sum = add_same(&a, &b).unwrap().expect("whole vectors, aligned");
            assert_eq!(f32s(&sum), f32s(&(&a + &b).unwrap()), "{dtype:?}: not candle's sum");
            let (a1, b1) = (
                a.flatten_all().unwrap().narrow(0, 1, 64).unwrap(),
                b.flatten_all().unwrap().narrow(0, 1, 64).unwrap(),
            );
            assert!(add_same(&a1, &b1).unwrap().is_none(), "{dtype:?}: a misaligned view taken");
            let (a2, b2) = (t(522, &[3, 3]), t(523, &[3, 3]));
            assert!(add_same(&a2, &b2).unwrap().is_none(), "{dtype:?}: a partial vector taken");
        }
        let (a, b) = (seeded_randn(524, 0.0, 1.0, &[64]).to_device(&gpu).unwrap(), seeded_randn(525, 0.0, 1.0, &[64]));
        let b = b.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap();
        assert!(add_same(&a, &b).unwrap().is_none(), "mixed dtypes taken");
    }
}

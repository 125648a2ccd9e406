//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments), with its state
//! exposed so a checkpoint can save it and `--resume` continue exactly.
//!
//! All parameters are updated as one flat vector: an adapter on every linear layer of a 22-layer model is 300+
//! small tensors, and a dozen element-wise kernels for each would cost more than the update itself.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    vars: Vec<Var>,
    /// Parameters, first and second moments as the rows of one `[3, n]` f32 tensor, flattened in `vars` order:
    /// the update rewrites it in place in one pass (one kernel on the GPU), nothing allocated.
    state: Tensor,
    pub step: usize,
    pub params: AdamWParams,
}

fn flatten(ts: &[&Tensor]) -> candle_core::Result<Tensor> {
    let flat = ts.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    // Detached: optimizer state must never hold a graph.
    Ok(Tensor::cat(&flat, 0)?.detach())
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        if vars.is_empty() {
            bail!("AdamW: no parameters to train");
        }
        let theta = flatten(&vars.iter().map(|v| v.as_tensor()).collect::<Vec<_>>())?;
        let zeros = theta.zeros_like()?;
        let state = Tensor::stack(&[&theta, &zeros, &zeros], 0)?;
        Ok(Self { vars, state, step: 0, params })
    }

    fn row(&self, i: usize) -> candle_core::Result<Tensor> {
        self.state.get(i)
    }

    /// A flat f32 gradient vector for these parameters, zeros: made once, filled by
    /// [`AdamW::gather_grads`] every step.
    pub fn gradient_buffer(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(self.state.dim(1)?, DType::F32, self.state.device())?)
    }

    /// Writes (or with `add`, adds) `grads[i]` (for `vars[i]`; `None`: zeros) into `flat` in one pass.
    pub fn gather_grads(&self, flat: &Tensor, grads: &[Option<Tensor>], add: bool) -> Result<()> {
        Ok(crate::ops::flat::gather(flat, &self.vars, grads, add)?)
    }

    /// One update from flat gradients with learning rate `lr`.
    pub fn step_flat(&mut self, g: &Tensor, lr: f64) -> Result<()> {
        self.step_scaled(g, 1.0, lr)
    }

    /// One update from flat gradients scaled by `scale` (gradient clipping) with learning rate `lr`, in
    /// place; then every variable takes its new values.
    pub fn step_scaled(&mut self, g: &Tensor, scale: f64, lr: f64) -> Result<()> {
        let n = self.state.dim(1)?;
        if g.dims() != [n] || g.dtype() != DType::F32 {
            bail!("AdamW: gradient of shape {:?} ({:?}) for {n} f32 parameters", g.dims(), g.dtype());
        }
        self.step += 1;
        let p = self.params;
        let update = Update {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            decay: (1.0 - lr * p.weight_decay) as f32,
            step_size: (lr / (1.0 - p.beta1.powi(self.step as i32))) as f32,
            inv_sqrt_bc2: (1.0 / (1.0 - p.beta2.powi(self.step as i32)).sqrt()) as f32,
            grad_scale: scale as f32,
        };
        self.state.inplace_op2(&g.contiguous()?, &update)?;
        crate::ops::flat::scatter(&self.row(0)?, &self.vars)?;
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let g = self.gradient_buffer()?;
        self.gather_grads(&g, &grads.iter().cloned().map(Some).collect::<Vec<_>>(), false)?;
        self.step_flat(&g, lr)
    }

    fn split(&self, flat: &Tensor, names: &[String], prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut offset = 0;
        for (var, n) in self.vars.iter().zip(names) {
            let k = var.elem_count();
            out.insert(format!("{prefix}.{n}"), flat.narrow(0, offset, k)?.reshape(var.shape())?);
            offset += k;
        }
        Ok(out)
    }

    /// Moments by name (`m.{name}` / `v.{name}`) for a checkpoint; `names[i]` names `vars[i]`.
    pub fn state(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut out = self.split(&self.row(1)?, names, "m")?;
        out.extend(self.split(&self.row(2)?, names, "v")?);
        Ok(out)
    }

    /// Restore moments saved by [`AdamW::state`] after `step` updates, and re-read the parameters (which the
    /// caller has restored into the variables).
    pub fn load_state(&mut self, names: &[String], state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut parts = (vec![], vec![]);
        for (var, n) in self.vars.iter().zip(names) {
            for (prefix, out) in [("m", &mut parts.0), ("v", &mut parts.1)] {
                let key = format!("{prefix}.{n}");
                let Some(t) = state.get(&key) else { bail!("optimizer state lacks {key}") };
                if t.dims() != var.dims() {
                    bail!("optimizer state {key} has shape {:?}, expected {:?}", t.dims(), var.dims());
                }
                out.push(t.to_device(var.device())?);
            }
        }
        let first = flatten(&parts.0.iter().collect::<Vec<_>>())?;
        let second = flatten(&parts.1.iter().collect::<Vec<_>>())?;
        let theta = flatten(&self.vars.iter().map(|v| v.as_tensor()).collect::<Vec<_>>())?;
        self.state = Tensor::stack(&[&theta, &first, &second], 0)?;
        self.step = step;
        Ok(())
    }
}

/// torch's AdamW update over `[θ | m | v]` (`[3, n]` f32, rewritten in place) from a flat f32 gradient:
/// `m = β1 m + (1 − β1) g`, `v = β2 v + (1 − β2) g²`, `θ = θ (1 − lr·wd) − lr/bc1 · m / (√v / √bc2 + ε)`
/// with `g` the gradient times `grad_scale`. The CPU and the CUDA kernel compute the same f32 operations.
struct Update {
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `1 − lr · weight_decay`.
    decay: f32,
    /// `lr / bc1`.
    step_size: f32,
    /// `1 / √bc2`.
    inv_sqrt_bc2: f32,
    grad_scale: f32,
}

impl Update {
    fn apply(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((t, m), v), g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * self.grad_scale;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * (g * g);
            *t = *t * self.decay - self.step_size * (*m / (v.sqrt() * self.inv_sqrt_bc2 + self.eps));
        }
    }
}

/// The state's `3n` and the gradient's `n` elements in their storages: both contiguous, of matching sizes.
fn ranges(
    l: &candle_core::Layout,
    gl: &candle_core::Layout,
) -> candle_core::Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let ((s1, s2), (g1, g2)) = match (l.contiguous_offsets(), gl.contiguous_offsets()) {
        (Some(a), Some(b)) => (a, b),
        _ => candle_core::bail!("adamw: contiguous state and gradient"),
    };
    let n = g2 - g1;
    if s2 - s1 != 3 * n {
        candle_core::bail!("adamw: state of {} for {n} parameters", s2 - s1);
    }
    Ok((s1..s2, g1..g2))
}

impl candle_core::InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(state), F32(g)) = (s, g) else { candle_core::bail!("adamw: f32 state and gradient") };
        let (state_range, g_range) = ranges(l, gl)?;
        let n = g_range.len();
        let (theta, rest) = state[state_range].split_at_mut(n);
        let (m, v) = rest.split_at_mut(n);
        self.apply(theta, m, v, &g[g_range]);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &candle_core::Layout,
        g: &candle_core::CudaStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::CudaStorageSlice;
        let (state_range, g_range) = ranges(l, gl)?;
        let n = g_range.len();
        let dev = s.device.clone();
        let f = crate::ops::fused::cuda::kernel(&dev, "adamw_f32")?;
        let CudaStorageSlice::F32(g) = &g.slice else { candle_core::bail!("adamw: f32 gradient") };
        let CudaStorageSlice::F32(state) = &mut s.slice else { candle_core::bail!("adamw: f32 state") };
        let g = g.slice(g_range);
        let mut state = state.slice_mut(state_range);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let n64 = n as i64;
        b.arg(&mut state).arg(&g).arg(&n64);
        for a in
            [&self.beta1, &self.beta2, &self.eps, &self.decay, &self.step_size, &self.inv_sqrt_bc2, &self.grad_scale]
        {
            b.arg(a);
        }
        let cfg = crate::ops::fused::cuda::grid_stride(n);
        // SAFETY: the kernel reads n gradients and rewrites the 3n state values, all inside these slices.
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    }
}

/// The global L2 norm of a flat gradient (one host read).
pub fn grad_norm(g: &Tensor) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() && g.dtype() == candle_core::DType::F32 {
        return Ok((crate::ops::fused::cuda::sum_squares(g)?.to_scalar::<f32>()? as f64).sqrt());
    }
    Ok((g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt())
}

/// The factor that brings a gradient of norm `norm` to at most `max_norm` (as torch's clip_grad_norm_
/// computes it).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The gradient norm on CUDA (our two-pass sum of squares) equals the CPU's.
    #[cfg(feature = "cuda")]
    #[test]
    fn grad_norm_on_cuda_equals_the_cpu() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        for n in [1usize, 1000, 300_001] {
            let g = crate::testing::seeded_randn(n as u64, 0.0, 1.0, &[n]);
            let (want, got) = (grad_norm(&g)?, grad_norm(&g.to_device(&gpu)?)?);
            assert!((got - want).abs() <= 1e-5 * want, "{n} values: {got} vs {want}");
        }
        Ok(())
    }

    /// torch.optim.AdamW's step in f64, for `theta`, moments `m`, `v` and gradient `g` (already scaled).
    fn reference(theta: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], step: i32, lr: f64, p: AdamWParams) {
        for i in 0..theta.len() {
            m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * g[i];
            v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - p.beta2.powi(step))).sqrt() + p.eps;
            theta[i] = theta[i] * (1.0 - lr * p.weight_decay) - lr / (1.0 - p.beta1.powi(step)) * m[i] / denom;
        }
    }

    /// Three in-place steps (with gradient scaling, weight decay and two variables of different shapes) against
    /// the f64 formula, on the CPU and, where there is one, on the GPU.
    #[test]
    fn in_place_update_follows_torch() -> Result<()> {
        let mut devices = vec![Device::Cpu];
        if let Ok(gpu) = Device::new_cuda(0) {
            devices.push(gpu);
        }
        let p = AdamWParams { weight_decay: 0.01, ..Default::default() };
        for device in devices {
            let a = crate::testing::seeded_randn(401, 0.0, 1.0, &[3, 5]).to_device(&device)?;
            let b = crate::testing::seeded_randn(402, 0.0, 1.0, &[7]).to_device(&device)?;
            let vars = vec![Var::from_tensor(&a)?, Var::from_tensor(&b)?];
            let mut want: Vec<f64> = [&a, &b]
                .iter()
                .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(f64::from)
                .collect();
            let (mut m, mut v) = (vec![0.0; 22], vec![0.0; 22]);
            let mut opt = AdamW::new(vars.clone(), p)?;
            for step in 1..=3 {
                let g = crate::testing::seeded_randn(410 + step as u64, 0.0, 0.5, &[22]);
                let scale = [1.0, 0.25, 0.5][step as usize - 1];
                let gs: Vec<f64> = g.to_vec1::<f32>()?.iter().map(|&x| (x * scale as f32) as f64).collect();
                reference(&mut want, &mut m, &mut v, &gs, step, 1e-2, p);
                opt.step_scaled(&g.to_device(&device)?, scale, 1e-2)?;
            }
            let got: Vec<f32> =
                vars.iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "{device:?} parameter {i}: {g} vs {w}");
            }
            let state = opt.state(&["a".into(), "b".into()])?;
            let m_b = state["m.b"].to_vec1::<f32>()?;
            assert!((m_b[6] as f64 - m[21]).abs() <= 1e-6, "{device:?}: first moment {} vs {}", m_b[6], m[21]);
        }
        Ok(())
    }
}

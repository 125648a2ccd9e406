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
    /// Parameters, first and second moments, flattened in `vars` order (f32).
    theta: Tensor,
    first: Tensor,
    second: Tensor,
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
        let first = theta.zeros_like()?;
        let second = theta.zeros_like()?;
        Ok(Self { vars, theta, first, second, step: 0, params })
    }

    /// The gradients (`grads[i]` for `vars[i]`) as one flat vector.
    pub fn flatten_grads(&self, grads: &[Tensor]) -> Result<Tensor> {
        if grads.len() != self.vars.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        Ok(flatten(&grads.iter().collect::<Vec<_>>())?)
    }

    /// One update from flat gradients with learning rate `lr`.
    pub fn step_flat(&mut self, g: &Tensor, lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        let m = ((&self.first * p.beta1)? + (g * (1.0 - p.beta1))?)?;
        let v = ((&self.second * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
        let update = ((&m / denom)? * (lr / bc1))?;
        self.theta = ((&self.theta * (1.0 - lr * p.weight_decay))? - update)?;
        self.first = m;
        self.second = v;
        let mut offset = 0;
        for var in &self.vars {
            let n = var.elem_count();
            let slice = self.theta.narrow(0, offset, n)?.reshape(var.shape())?.to_dtype(var.dtype())?;
            var.set(&slice)?;
            offset += n;
        }
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let g = self.flatten_grads(grads)?;
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
        let mut out = self.split(&self.first, names, "m")?;
        out.extend(self.split(&self.second, names, "v")?);
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
        self.first = flatten(&parts.0.iter().collect::<Vec<_>>())?;
        self.second = flatten(&parts.1.iter().collect::<Vec<_>>())?;
        self.theta = flatten(&self.vars.iter().map(|v| v.as_tensor()).collect::<Vec<_>>())?;
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of a flat gradient (one host read).
pub fn grad_norm(g: &Tensor) -> Result<f64> {
    Ok((g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt())
}

/// Scale a flat gradient so its norm is at most `max_norm` (as torch's clip_grad_norm_ does).
pub fn clip(g: Tensor, norm: f64, max_norm: f64) -> Result<Tensor> {
    if norm.is_finite() && norm > max_norm {
        Ok((g * (max_norm / (norm + 1e-6)))?)
    } else {
        Ok(g)
    }
}

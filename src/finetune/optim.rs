//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments), with its state
//! exposed so a checkpoint can save it and `--resume` continue bit for bit.

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
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    pub step: usize,
    pub params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let second = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, first, second, step: 0, params })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let g = grads[i].to_dtype(var.dtype())?;
            let m = ((&self.first[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.second[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let theta = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((m.clone() / denom)? * (lr / bc1))?;
            var.set(&(theta - update)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// Moments by name (`m.{name}` / `v.{name}`) for a checkpoint; `names[i]` names `vars[i]`.
    pub fn state(&self, names: &[String]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            out.insert(format!("m.{n}"), self.first[i].clone());
            out.insert(format!("v.{n}"), self.second[i].clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`] after `step` updates.
    pub fn load_state(&mut self, names: &[String], state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, n) in names.iter().enumerate() {
            for (key, slot) in [(format!("m.{n}"), &mut self.first[i]), (format!("v.{n}"), &mut self.second[i])] {
                let Some(t) = state.get(&key) else { bail!("optimizer state lacks {key}") };
                if t.dims() != slot.dims() {
                    bail!("optimizer state {key} has shape {:?}, expected {:?}", t.dims(), slot.dims());
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    // One host read for all tensors.
    let sums =
        grads.iter().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let norm = (Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt();
    if norm.is_finite() && norm > max_norm {
        let k = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(norm)
}

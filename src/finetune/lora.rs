//! LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`); the layer computes
//! `W x + (alpha / r) · B (A x)`.

use crate::model::linear::LoraAdapter;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Does the module named `name` (a full HF module path) take an adapter?
    pub fn targets(&self, name: &str) -> bool {
        let last = name.rsplit('.').next().unwrap_or(name);
        self.target_modules.iter().any(|t| t == "all-linear" || t == last || name.ends_with(&format!(".{t}")))
    }
}

/// Trainable adapter parameters, by module name.
pub struct Lora {
    pub config: LoraConfig,
    pub params: Vec<(String, Var, Var)>,
}

impl Lora {
    /// Read a PEFT adapter folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let config: LoraConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a LoRA adapter config", cfg_path.display()))?;
        let weights = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let mut by_module: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, t) in tensors {
            let Some(rest) = name.strip_prefix("base_model.model.") else { continue };
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                by_module.entry(m.to_string()).or_default().0 = Some(t.to_dtype(DType::F32)?);
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                by_module.entry(m.to_string()).or_default().1 = Some(t.to_dtype(DType::F32)?);
            }
        }
        let mut params = vec![];
        for (module, (a, b)) in by_module {
            let (Some(a), Some(b)) = (a, b) else { bail!("{}: {module} lacks lora_A or lora_B", weights.display()) };
            params.push((module, Var::from_tensor(&a)?, Var::from_tensor(&b)?));
        }
        params.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(Self { config, params })
    }

    /// Attach to the model's linear layers (their names must match the adapter's modules).
    pub fn attach(&self, model: &mut Model) -> Result<()> {
        let scale = self.config.scaling();
        let mut found = 0;
        for (name, linear) in model.linears_mut() {
            if let Some((_, a, b)) = self.params.iter().find(|(m, _, _)| *m == name) {
                let (r, inp) = a.as_tensor().dims2()?;
                if inp != linear.in_features() || b.as_tensor().dims2()? != (linear.out_features(), r) {
                    bail!(
                        "adapter for {name} has shapes A {:?} B {:?}, the layer is {}x{}",
                        a.as_tensor().dims(),
                        b.as_tensor().dims(),
                        linear.out_features(),
                        linear.in_features()
                    );
                }
                linear.set_lora(Some(LoraAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale }));
                found += 1;
            }
        }
        if found != self.params.len() {
            bail!("{} of the adapter's {} modules exist in the model", found, self.params.len());
        }
        Ok(())
    }

    /// Write the adapter in PEFT's format.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut cfg = serde_json::to_value(&self.config)?;
        cfg["peft_type"] = "LORA".into();
        cfg["task_type"] = "CAUSAL_LM".into();
        cfg["bias"] = "none".into();
        cfg["fan_in_fan_out"] = false.into();
        cfg["inference_mode"] = true.into();
        crate::util::write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        let mut tensors = HashMap::new();
        for (m, a, b) in &self.params {
            tensors.insert(format!("base_model.model.{m}.lora_A.weight"), a.as_tensor().clone());
            tensors.insert(format!("base_model.model.{m}.lora_B.weight"), b.as_tensor().clone());
        }
        crate::util::save_safetensors_atomic(&dir.join("adapter_model.safetensors"), &tensors)
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().flat_map(|(_, a, b)| [a.clone(), b.clone()]).collect()
    }

    /// `W + scaling · B A` for a module's base weight `w`.
    pub fn merged_weight(&self, module: &str, w: &Tensor) -> Result<Tensor> {
        let (_, a, b) =
            self.params.iter().find(|(m, _, _)| m == module).with_context(|| format!("no adapter for {module}"))?;
        let delta = (b.as_tensor().matmul(a.as_tensor())? * self.config.scaling())?;
        Ok((w.to_dtype(DType::F32)? + delta)?)
    }
}

/// Hugging Face's causal-LM loss: logits at t predict labels at t+1; targets equal to -100 are ignored; the
/// mean over the rest. `logits` `[b, t, vocab]`, `labels` `[b, t]` (i64).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let mut rows = vec![];
    let mut targets = vec![];
    for bi in 0..b {
        for ti in 0..t - 1 {
            let l = labels[bi * t + ti + 1];
            if l != -100 {
                if l < 0 || l as usize >= v {
                    bail!("label {l} is outside the vocabulary of {v}");
                }
                rows.push((bi * t + ti) as u32);
                targets.push(l as u32);
            }
        }
    }
    if rows.is_empty() {
        bail!("every label is ignored (-100): nothing to learn from");
    }
    let device = logits.device();
    let flat = logits.reshape((b * t, v))?;
    let picked = flat.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let target = Tensor::new(targets.as_slice(), device)?.unsqueeze(1)?;
    let nll = logp.gather(&target, 1)?.neg()?;
    Ok(nll.mean_all()?)
}

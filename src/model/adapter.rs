//! LoRA adapters in PEFT's format, for inference (`--adapter`) and training alike: `adapter_config.json` +
//! `adapter_model.safetensors` with tensors named `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `.lora_B.weight` (`[out, r]`); the layer computes `W x + (alpha / r) · B (A x)`. Adapter and model files
//! are written whole (temporary file, on disk, rename) with mode 0644: `util::write_atomic`,
//! `util::save_safetensors_atomic`.

use super::linear::LoraAdapter;
use super::{Model, ModelConfig};
use crate::util::{save_safetensors_atomic, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
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

    /// A new adapter on every linear layer `config` targets, initialised as peft does: A Kaiming-uniform
    /// (`a = √5`, so U(±1/√in)), B zeros — the model's output is unchanged until B learns. Seeded.
    pub fn init(model: &mut Model, config: LoraConfig, seed: u64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        if config.r == 0 {
            bail!("the adapter rank must be at least 1");
        }
        let device = model.device().clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut params = vec![];
        let mut all_names = vec![];
        for (name, linear) in model.linears_mut() {
            all_names.push(name.rsplit('.').next().unwrap_or(&name).to_string());
            if !config.targets(&name) {
                continue;
            }
            let (inp, out) = (linear.in_features(), linear.out_features());
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..config.r * inp).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), &device)?)?;
            let b = Var::zeros((out, config.r), DType::F32, &device)?;
            params.push((name, a, b));
        }
        if params.is_empty() {
            all_names.dedup();
            all_names.sort();
            all_names.dedup();
            bail!(
                "target modules {}: no such linear layer in this model (it has: {}, or `all`)",
                config.target_modules.join(","),
                all_names.join(", ")
            );
        }
        params.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(Self { config, params })
    }

    /// Attach for training: the layers read the trainable variables themselves, with `dropout` on the
    /// adapter's input.
    pub fn attach_trainable(&self, model: &mut Model, dropout: f32) -> Result<()> {
        self.attach_as(model, dropout, None, false)
    }

    /// Attach a frozen snapshot for inference (no gradient tracking, no dropout), in `dtype`.
    pub fn attach_frozen(&self, model: &mut Model, dtype: DType) -> Result<()> {
        self.attach_as(model, 0.0, Some(dtype), true)
    }

    /// Attach to the model's linear layers (their names must match the adapter's modules).
    pub fn attach(&self, model: &mut Model) -> Result<()> {
        self.attach_as(model, 0.0, None, false)
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, a, b)| a.elem_count() + b.elem_count()).sum()
    }

    /// Parameter names as they appear in the adapter file, in `vars()` order.
    pub fn var_names(&self) -> Vec<String> {
        self.params.iter().flat_map(|(m, _, _)| [format!("{m}.lora_A"), format!("{m}.lora_B")]).collect()
    }

    fn attach_as(&self, model: &mut Model, dropout: f32, dtype: Option<DType>, frozen: bool) -> Result<()> {
        let scale = self.config.scaling();
        let prep = |t: &Tensor| -> Result<Tensor> {
            let t = if frozen { t.detach() } else { t.clone() };
            Ok(match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            })
        };
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
                let (a, b) = (prep(a.as_tensor())?, prep(b.as_tensor())?);
                linear.set_lora(Some(LoraAdapter { a, b, scale, dropout }));
                found += 1;
            }
        }
        if found != self.params.len() {
            bail!("{} of the adapter's {} modules exist in the model", found, self.params.len());
        }
        Ok(())
    }

    /// Replace the values of every parameter (checkpoint resume); names and shapes must match.
    pub fn load_values(&self, other: &Lora) -> Result<()> {
        for (m, a, b) in &self.params {
            let Some((_, oa, ob)) = other.params.iter().find(|(n, _, _)| n == m) else {
                bail!("the checkpoint has no adapter for {m}")
            };
            if oa.dims() != a.dims() || ob.dims() != b.dims() {
                bail!("the checkpoint's adapter for {m} has other shapes (rank changed?)");
            }
            a.set(&oa.as_tensor().to_device(a.device())?)?;
            b.set(&ob.as_tensor().to_device(b.device())?)?;
        }
        Ok(())
    }

    /// A copy with q/k adapters moved between Hugging Face's row order and the interleaved-rotary order that
    /// llama GGUF files use (`to_interleaved` picks the direction). PEFT files always hold HF's order, so an
    /// adapter trained on a GGUF base loads onto the transformers model, and the other way round.
    pub fn with_rope_layout(&self, cfg: &ModelConfig, to_interleaved: bool) -> Result<Lora> {
        let mut params = vec![];
        for (m, a, b) in &self.params {
            let heads = if m.ends_with("q_proj") {
                Some(cfg.num_heads)
            } else if m.ends_with("k_proj") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            let b = match heads.filter(|_| cfg.rope_interleaved) {
                Some(h) => {
                    let t = b.as_tensor();
                    let (out, r) = t.dims2()?;
                    let hd = out / h;
                    let t = if to_interleaved {
                        t.reshape((h, 2, hd / 2, r))?.transpose(1, 2)?
                    } else {
                        t.reshape((h, hd / 2, 2, r))?.transpose(1, 2)?
                    };
                    Var::from_tensor(&t.contiguous()?.reshape((out, r))?)?
                }
                None => Var::from_tensor(b.as_tensor())?,
            };
            params.push((m.clone(), Var::from_tensor(a.as_tensor())?, b));
        }
        Ok(Lora { config: self.config.clone(), params })
    }

    /// Read a PEFT adapter for `cfg`'s model (reordering q/k rows for GGUF llama bases).
    pub fn load_for(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let l = Self::load(dir, device)?;
        if cfg.rope_interleaved {
            l.with_rope_layout(cfg, true)
        } else {
            Ok(l)
        }
    }

    /// Write in PEFT's format from `cfg`'s model (Hugging Face row order).
    pub fn save_for(&self, dir: &Path, cfg: &ModelConfig) -> Result<()> {
        if cfg.rope_interleaved {
            self.with_rope_layout(cfg, false)?.save(dir)
        } else {
            self.save(dir)
        }
    }

    /// Write the adapter in PEFT's format.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cfg = serde_json::to_value(&self.config)?;
        cfg["peft_type"] = "LORA".into();
        cfg["task_type"] = "CAUSAL_LM".into();
        cfg["bias"] = "none".into();
        cfg["fan_in_fan_out"] = false.into();
        cfg["inference_mode"] = true.into();
        let mut tensors = HashMap::new();
        for (m, a, b) in &self.params {
            tensors.insert(format!("base_model.model.{m}.lora_A.weight"), a.as_tensor().clone());
            tensors.insert(format!("base_model.model.{m}.lora_B.weight"), b.as_tensor().clone());
        }
        // Tensors first: a folder whose config is there has its tensors too.
        save_safetensors_atomic(&dir.join("adapter_model.safetensors"), &tensors)?;
        write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;

    struct Tiny {
        model: Model,
    }

    /// A tiny llama written to `dir` and built from its safetensors (f32, CPU).
    fn tiny_model(dir: &Path) -> Tiny {
        let cfg =
            crate::testing::write_hf_model(dir, &crate::testing::tiny_config(Architecture::Llama, 320), 3).unwrap();
        let files = crate::formats::safetensors::model_files(dir).unwrap();
        let w = crate::model::weights::Weights::safetensors(files, cfg.architecture, DType::F32, &Device::Cpu).unwrap();
        Tiny { model: Model::build(&cfg, &w).unwrap() }
    }

    fn config(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            lora_dropout: 0.0,
            base_model_name_or_path: None,
        }
    }

    #[test]
    fn init_is_peft_kaiming_a_and_zero_b() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = tiny_model(dir.path());
        let l = Lora::init(&mut m.model, config(&["q_proj", "down_proj"]), 1).unwrap();
        assert_eq!(l.params.len(), 4, "2 layers × 2 targets");
        for (name, a, b) in &l.params {
            let inp = a.dim(1).unwrap();
            let bound = 1.0 / (inp as f32).sqrt();
            let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name}: A within ±1/√in");
            let spread = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(spread > 0.8 * bound, "{name}: A fills its range");
            assert_eq!(b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{name}: B is zero");
        }
        // Zero B: attaching leaves the model's output unchanged (to the bit: both passes the regular one; our
        // CPU pass takes no unmerged adapter).
        m.model.cpu_forward.disable();
        let ids = m.model.input(&[1, 5, 9, 3]).unwrap();
        let before = m.model.forward(&ids, &mut m.model.new_cache()).unwrap();
        l.attach_trainable(&mut m.model, 0.0).unwrap();
        let after = m.model.forward(&ids, &mut m.model.new_cache()).unwrap();
        assert_eq!(before.to_vec3::<f32>().unwrap(), after.to_vec3::<f32>().unwrap());
        assert!(Lora::init(&mut m.model, config(&["nope"]), 1).is_err());
        assert_eq!(l.num_params(), 2 * ((4 * 64 + 64 * 4) + (4 * 128 + 64 * 4)));
    }

    #[test]
    fn rope_layout_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = tiny_model(dir.path());
        let l = Lora::init(&mut m.model, config(&["q_proj", "k_proj", "v_proj"]), 2).unwrap();
        for (_, _, b) in &l.params {
            b.set(&crate::testing::seeded_randn(31, 0.0, 1.0, b.dims())).unwrap();
        }
        let mut cfg = m.model.config().clone();
        cfg.rope_interleaved = true;
        let there = l.with_rope_layout(&cfg, true).unwrap();
        let back = there.with_rope_layout(&cfg, false).unwrap();
        for ((n, _, b0), (_, _, b1)) in l.params.iter().zip(&back.params) {
            assert_eq!(b0.to_vec2::<f32>().unwrap(), b1.to_vec2::<f32>().unwrap(), "{n}");
        }
        let moved = l
            .params
            .iter()
            .zip(&there.params)
            .filter(|((_, _, x), (_, _, y))| x.to_vec2::<f32>().unwrap() != y.to_vec2::<f32>().unwrap());
        assert_eq!(moved.count(), 4, "q and k rows reorder, v stays");
    }
}

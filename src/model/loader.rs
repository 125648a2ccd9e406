//! `--model` → a ready model: a Hugging Face folder, a GGUF file, or a config.json with `--random-weights`.

use super::config::ModelConfig;
use super::device::{select_device, select_dtype};
use super::gguf::{config_from_gguf, read_content};
use super::weights::{safetensors_files, Quantize, Weights};
use super::Model;
use crate::tokenizer::{self, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub quantize: Option<Quantize>,
    pub random_weights: bool,
    /// GGUF only: expand quantized tensors to dense weights (a full-precision copy of a quantized model).
    pub dequantize: bool,
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    /// What `--model` resolved to.
    pub source: PathBuf,
    pub format: &'static str,
    pub load_seconds: f64,
    /// "none", "q8_0", … or the GGUF file's main tensor type.
    pub quantization: String,
    /// Weights that `--quantize` left dense because their shape does not fit the block size.
    pub kept_dense: Vec<String>,
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "{}: the model has no tokenizer (tokenizer.json); pass --prompt-ids instead of text",
                self.source.display()
            )
        })
    }

    /// End-of-sequence ids: the tokenizer's and the model config's, merged.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.config().eos_token_ids.clone();
        if let Some(t) = &self.tokenizer {
            for &id in &t.eos_ids {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }
}

/// What kind of thing `--model` names, decided before any weight is read.
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
    ConfigOnly(PathBuf),
}

pub fn resolve(model: &str, random_weights: bool) -> Result<ModelSource> {
    let mut p = PathBuf::from(model);
    if !p.exists() {
        if crate::hub::is_hub_name(model) {
            p = crate::hub::resolve_model(model, "main")?;
        } else {
            bail!("--model {model}: no such file or folder (and not a hub name: use an alias from `billion download --list` or org/name)");
        }
    }
    if p.is_dir() {
        let cfg = p.join("config.json");
        if !cfg.exists() {
            bail!("--model {model}: folder has no config.json (expected a Hugging Face model folder or a .gguf file)");
        }
        return Ok(if random_weights { ModelSource::ConfigOnly(cfg) } else { ModelSource::HfDir(p) });
    }
    let is_gguf = {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(&p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"GGUF"
    };
    if is_gguf || p.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelSource::Gguf(p));
    }
    if p.extension().is_some_and(|e| e == "json") {
        if !random_weights {
            bail!("--model {model}: a config.json alone has no weights; add --random-weights to run its shapes with random values");
        }
        return Ok(ModelSource::ConfigOnly(p));
    }
    bail!("--model {model}: expected a Hugging Face model folder, a .gguf file, or a config.json with --random-weights")
}

pub fn load(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let start = Instant::now();
    let device = select_device(opts.device.as_deref())?;
    let source = resolve(model, opts.random_weights)?;
    let dtype = select_dtype(opts.dtype.as_deref(), &device)?;
    let (model, tokenizer, path, format, quantization, kept_dense) = match source {
        ModelSource::HfDir(dir) => {
            if opts.dequantize {
                bail!("--dequantize applies to GGUF files; {} holds dense weights already", dir.display());
            }
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let files = safetensors_files(&dir)?;
            let w = Weights::safetensors(files, cfg.architecture, dtype, &device)?.with_quantize(opts.quantize);
            let m = Model::build(&cfg, &w)?;
            let tok = tokenizer::from_model_dir(&dir)?;
            let q = opts.quantize.map(|q| q.name().to_string()).unwrap_or_else(|| "none".into());
            (m, tok, dir, "safetensors", q, w.kept_dense.into_inner())
        }
        ModelSource::ConfigOnly(cfg_path) => {
            let cfg = ModelConfig::from_hf_file(&cfg_path)?;
            let w = Weights::random(cfg.architecture, dtype, &device).with_quantize(opts.quantize);
            let m = Model::build(&cfg, &w)?;
            // A tokenizer beside the config (a model folder) still helps turn text into ids.
            let tok = match cfg_path.parent() {
                Some(dir) if dir.join("tokenizer.json").exists() => tokenizer::from_model_dir(dir)?,
                _ => None,
            };
            let q = opts.quantize.map(|q| q.name().to_string()).unwrap_or_else(|| "none".into());
            (m, tok, cfg_path, "random", q, w.kept_dense.into_inner())
        }
        ModelSource::Gguf(path) => {
            if opts.quantize.is_some() {
                bail!("--quantize applies to safetensors weights; {} is already a GGUF file", path.display());
            }
            let content = read_content(&path)?;
            let cfg = config_from_gguf(&content, &path)?;
            // Quantized GGUF matmuls take f32 activations; f32 is the default compute dtype for them on CPU.
            let dtype = gguf_dtype(opts.dtype.as_deref(), &device, dtype);
            let quant = if opts.dequantize {
                format!("{} dequantized", main_tensor_type(&content))
            } else {
                main_tensor_type(&content)
            };
            let tok = match Tokenizer::from_gguf(&content, &path) {
                Ok(t) => Some(t),
                Err(e) if content.metadata.contains_key("tokenizer.ggml.model") => return Err(e),
                Err(_) => None,
            };
            let w = Weights::gguf(content, &path, cfg.architecture, dtype, &device)?.with_dequantize(opts.dequantize);
            let m = Model::build(&cfg, &w)?;
            (m, tok, path, "gguf", quant, vec![])
        }
    };
    if let Some(t) = &tokenizer {
        if t.vocab_size() > model.config().vocab_size {
            bail!(
                "{}: tokenizer has {} tokens but the model's vocabulary is {}",
                path.display(),
                t.vocab_size(),
                model.config().vocab_size
            );
        }
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        source: path,
        format,
        load_seconds: start.elapsed().as_secs_f64(),
        quantization,
        kept_dense,
    })
}

fn gguf_dtype(spec: Option<&str>, device: &Device, default: DType) -> DType {
    match (spec, device) {
        (Some(_), _) => default,
        (None, Device::Cpu) => DType::F32,
        (None, _) => default,
    }
}

/// The most common tensor type among a GGUF file's 2-D weights (what the file "is": Q4_1, Q8_0, F32 …).
fn main_tensor_type(c: &candle_core::quantized::gguf_file::Content) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for info in c.tensor_infos.values() {
        if info.shape.rank() == 2 {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += info.shape.elem_count();
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k).unwrap_or_else(|| "unknown".into())
}

/// Model folder or file for messages.
pub fn describe(p: &Path) -> String {
    p.display().to_string()
}

/// What `billion info` reports, computed from the config and file sizes without reading weights.
#[derive(Debug, serde::Serialize)]
pub struct ModelInfo {
    pub source: String,
    pub format: &'static str,
    pub architecture: &'static str,
    pub parameters: u64,
    pub weights_dtype: String,
    pub compute_dtype: &'static str,
    pub context_length: usize,
    pub vocab_size: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Bytes of weights in memory once loaded.
    pub weights_bytes: u64,
    pub kv_cache_bytes_per_token: u64,
    /// Weights plus a KV cache filling the whole context window.
    pub total_bytes_full_context: u64,
}

pub fn inspect(model: &str, opts: &LoadOptions) -> Result<ModelInfo> {
    let source = resolve(model, opts.random_weights)?;
    let device = select_device(opts.device.as_deref().or(Some("cpu")))?;
    let compute = select_dtype(opts.dtype.as_deref(), &device)?;
    let (cfg, format, weights_dtype, weights_bytes, path) = match source {
        ModelSource::Gguf(path) => {
            let c = read_content(&path)?;
            let cfg = config_from_gguf(&c, &path)?;
            let bytes: u64 = c
                .tensor_infos
                .values()
                .map(|i| (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64)
                .sum();
            (cfg, "gguf", main_tensor_type(&c), bytes, path)
        }
        ModelSource::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let files = safetensors_files(&dir)?;
            let file_dtype = safetensors_dtype(&files[0]).unwrap_or_else(|| "unknown".into());
            let bytes = quantized_or_dense_bytes(&cfg, opts.quantize, compute);
            (cfg, "safetensors", file_dtype, bytes, dir)
        }
        ModelSource::ConfigOnly(path) => {
            let cfg = ModelConfig::from_hf_file(&path)?;
            let bytes = quantized_or_dense_bytes(&cfg, opts.quantize, compute);
            (cfg, "random", "random".to_string(), bytes, path)
        }
    };
    let weights_dtype = match opts.quantize {
        Some(q) => q.name().to_string(),
        None => weights_dtype,
    };
    let kv = cfg.kv_bytes_per_token(compute.size_in_bytes());
    Ok(ModelInfo {
        source: path.display().to_string(),
        format,
        architecture: cfg.architecture.name(),
        parameters: cfg.parameter_count(),
        weights_dtype,
        compute_dtype: super::device::dtype_name(compute),
        context_length: cfg.max_position_embeddings,
        vocab_size: cfg.vocab_size,
        layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        weights_bytes,
        kv_cache_bytes_per_token: kv,
        total_bytes_full_context: weights_bytes + kv * cfg.max_position_embeddings as u64,
    })
}

/// Bytes of weights at the compute dtype, or with linear layers quantized.
fn quantized_or_dense_bytes(cfg: &ModelConfig, q: Option<Quantize>, dtype: DType) -> u64 {
    let params = cfg.parameter_count();
    let elem = dtype.size_in_bytes() as u64;
    match q {
        None => params * elem,
        Some(q) => {
            let g = q.ggml();
            let embed = (cfg.vocab_size * cfg.hidden_size) as u64;
            let linear = params.saturating_sub(embed);
            embed * elem + linear * g.type_size() as u64 / g.block_size() as u64
        }
    }
}

fn safetensors_dtype(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let mut h = vec![0u8; u64::from_le_bytes(n).min(100_000_000) as usize];
    f.read_exact(&mut h).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&h).ok()?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for (k, t) in v.as_object()? {
        if k != "__metadata__" {
            *counts.entry(t.get("dtype")?.as_str()?.to_lowercase()).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k)
}

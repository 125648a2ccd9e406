//! Loading: a model name → a ready model. A Hugging Face folder, a GGUF file, a config.json with random
//! weights, or a hub name resolved through the local cache (downloaded when missing); device and dtype
//! selection (`device.rs`); what a model needs before it is loaded (`info.rs`).

pub mod device;
pub mod info;

pub use device::{parse_dtype, DeviceSpec};

use crate::formats::{gguf, safetensors};
use crate::model::quant::Quantize;
use crate::model::weights::Weights;
use crate::model::{Model, ModelConfig};
use crate::tokenizer::{self, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use device::{select_device, select_dtype};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// None: CUDA, then Metal, then CPU.
    pub device: Option<DeviceSpec>,
    /// None: bf16 on CUDA, f16 on Metal, f32 on CPU (f32 for GGUF files on CPU).
    pub dtype: Option<DType>,
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
                "{}: the model has no tokenizer (tokenizer.json); give token ids instead of text",
                self.source.display()
            )
        })
    }

    /// What to tell the user when `--quantize` left weights dense (their rows are not whole blocks of the type),
    /// so that a model larger than the type suggests is explained; `None` when nothing was.
    pub fn kept_dense_note(&self) -> Option<String> {
        let shown: Vec<&str> = self.kept_dense.iter().take(3).map(|s| s.as_str()).collect();
        (!shown.is_empty()).then(|| {
            format!(
                "{} weights kept dense (rows not whole blocks of {}): {}{}",
                self.kept_dense.len(),
                self.quantization,
                shown.join(", "),
                if self.kept_dense.len() > shown.len() { ", …" } else { "" }
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

/// What kind of thing a model name is, decided before any weight is read.
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
            bail!("{model}: no such file or folder (and not a hub name: use an alias from `billion download --list` or org/name)");
        }
    }
    if p.is_dir() {
        let cfg = p.join("config.json");
        if !cfg.exists() {
            bail!("{model}: folder has no config.json (expected a Hugging Face model folder or a .gguf file)");
        }
        return Ok(if random_weights { ModelSource::ConfigOnly(cfg) } else { ModelSource::HfDir(p) });
    }
    if gguf::has_magic(&p) || p.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelSource::Gguf(p));
    }
    if p.extension().is_some_and(|e| e == "json") {
        if !random_weights {
            bail!("{model}: a config.json alone has no weights; load it with random weights (--random-weights) to run its shapes with random values");
        }
        return Ok(ModelSource::ConfigOnly(p));
    }
    bail!("{model}: expected a Hugging Face model folder, a .gguf file, or a config.json (with random weights)")
}

/// Which input a load error is about, so that a caller can say which of its own settings (flags) to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadInput {
    /// The model name, its files or their contents.
    Model,
    Device,
    Quantize,
    Dequantize,
}

/// A load that failed, and the input it is about. Reads as the underlying error.
#[derive(Debug)]
pub struct LoadError {
    pub input: LoadInput,
    pub error: anyhow::Error,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Mark an error as being about `input` (errors already marked keep their mark).
pub(crate) fn about<T>(r: Result<T>, input: LoadInput) -> Result<T> {
    r.map_err(|error| {
        if error.downcast_ref::<LoadError>().is_some() {
            error
        } else {
            anyhow::Error::new(LoadError { input, error })
        }
    })
}

/// Load `model` as `opts` say. Errors are [`LoadError`]s naming the input at fault.
pub fn load(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    about(load_unmarked(model, opts), LoadInput::Model)
}

fn load_unmarked(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let start = Instant::now();
    let source = resolve(model, opts.random_weights)?;
    let device = about(select_device(opts.device), LoadInput::Device)?;
    let dtype = select_dtype(opts.dtype, &device);
    let (model, tokenizer, path, format, quantization, kept_dense) = match source {
        ModelSource::HfDir(dir) => {
            if opts.dequantize {
                let e = anyhow::anyhow!(
                    "dequantizing applies to GGUF files; {} holds dense weights already",
                    dir.display()
                );
                return about(Err(e), LoadInput::Dequantize);
            }
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let files = safetensors::model_files(&dir)?;
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
                let e = anyhow::anyhow!(
                    "quantizing at load applies to safetensors weights; {} is already a GGUF file",
                    path.display()
                );
                return about(Err(e), LoadInput::Quantize);
            }
            let content = gguf::read_content(&path)?;
            let cfg = ModelConfig::from_gguf(&content, &path)?;
            // Quantized GGUF matmuls take f32 activations; f32 is the default compute dtype for them on CPU.
            let dtype = gguf_dtype(opts.dtype, &device, dtype);
            let quant = if opts.dequantize {
                format!("{} dequantized", gguf::main_tensor_type(&content))
            } else {
                gguf::main_tensor_type(&content)
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

fn gguf_dtype(spec: Option<DType>, device: &Device, default: DType) -> DType {
    match (spec, device) {
        (Some(_), _) => default,
        (None, Device::Cpu) => DType::F32,
        (None, _) => default,
    }
}

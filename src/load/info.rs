//! What `billion info` reports: computed from the config and the files' headers, without reading weights.

use super::device::{dtype_name, select_dtype};
use super::{resolve, LoadOptions, ModelSource};
use crate::formats::{gguf, safetensors};
use crate::model::quant::Quantize;
use crate::model::ModelConfig;
use anyhow::Result;
use candle_core::{DType, Device};

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

/// Describe `model` as `opts` would load it (on the CPU unless a device is given).
pub fn inspect(model: &str, opts: &LoadOptions) -> Result<ModelInfo> {
    let source = resolve(model, opts.random_weights)?;
    let device = match opts.device {
        Some(super::DeviceSpec::Cuda(_)) => None,
        _ => Some(Device::Cpu),
    };
    // The default dtype of a CUDA load, without opening the device.
    let compute = match device {
        Some(d) => select_dtype(opts.dtype, &d),
        None => opts.dtype.unwrap_or(DType::BF16),
    };
    let (cfg, format, weights_dtype, weights_bytes, path) = match source {
        ModelSource::Gguf(path) => {
            let c = gguf::read_content(&path)?;
            let cfg = ModelConfig::from_gguf(&c, &path)?;
            (cfg, "gguf", gguf::main_tensor_type(&c), gguf::tensor_bytes(&c), path)
        }
        ModelSource::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            // Every shard's header is read and checked against its file, so a truncated download is found here.
            let mut main_dtype = None;
            for file in safetensors::model_files(&dir)? {
                let header = safetensors::read_header(&file)?;
                main_dtype = main_dtype.or(header.main_dtype());
            }
            let bytes = quantized_or_dense_bytes(&cfg, opts.quantize, compute);
            (cfg, "safetensors", main_dtype.unwrap_or_else(|| "unknown".into()), bytes, dir)
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
        compute_dtype: dtype_name(compute),
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

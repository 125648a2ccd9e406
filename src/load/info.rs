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
    /// Weights that `--quantize` leaves dense because their width is not a multiple of the type's block.
    pub kept_dense_weights: usize,
    pub kv_cache_bytes_per_token: u64,
    /// Weights plus a KV cache filling the whole context window.
    pub total_bytes_full_context: u64,
}

/// Describe `model` as `opts` would load it (on the CPU unless a device is given).
/// Errors are [`super::LoadError`]s naming the input at fault, as a load's are.
pub fn inspect(model: &str, opts: &LoadOptions) -> Result<ModelInfo> {
    super::about(inspect_unmarked(model, opts), super::LoadInput::Model)
}

fn inspect_unmarked(model: &str, opts: &LoadOptions) -> Result<ModelInfo> {
    let source = resolve(model, opts.random_weights)?;
    // The compute dtype a load would pick on that device, without opening it.
    let compute = match opts.device {
        Some(super::DeviceSpec::Cuda(_)) => opts.dtype.unwrap_or(DType::BF16),
        Some(super::DeviceSpec::Metal) => opts.dtype.unwrap_or(DType::F16),
        _ => select_dtype(opts.dtype, &Device::Cpu),
    };
    // The same refusals as a load.
    match (&source, opts.quantize.is_some(), opts.dequantize) {
        (ModelSource::Gguf(p), true, _) => {
            let e = anyhow::anyhow!(
                "quantizing at load applies to safetensors weights; {} is already a GGUF file",
                p.display()
            );
            return super::about(Err(e), super::LoadInput::Quantize);
        }
        (ModelSource::HfDir(p) | ModelSource::ConfigOnly(p), _, true) => {
            let e = anyhow::anyhow!("dequantizing applies to GGUF files; {} holds dense weights already", p.display());
            return super::about(Err(e), super::LoadInput::Dequantize);
        }
        _ => {}
    }
    let (cfg, format, weights_dtype, (weights_bytes, kept_dense_weights), path) = match source {
        ModelSource::Gguf(path) => {
            let c = gguf::read_content(&path)?;
            let cfg = ModelConfig::from_gguf(&c, &path)?;
            (cfg, "gguf", gguf::main_tensor_type(&c), (gguf::tensor_bytes(&c), 0), path)
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
        kept_dense_weights,
        kv_cache_bytes_per_token: kv,
        total_bytes_full_context: weights_bytes + kv * cfg.max_position_embeddings as u64,
    })
}

/// Bytes of weights at the compute dtype, or with linear layers quantized where their width allows (the rest
/// stay dense, as the loader keeps them), counted as `Model::weight_bytes` counts them.
fn quantized_or_dense_bytes(cfg: &ModelConfig, q: Option<Quantize>, dtype: DType) -> (u64, usize) {
    let params = cfg.parameter_count();
    let elem = dtype.size_in_bytes() as u64;
    let Some(q) = q else { return (params * elem, 0) };
    let (v, h, layers) = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers);
    let linears = (cfg.architecture.spec().layer_linears)(cfg);
    let mut kept_dense = 0;
    let mut bytes = 0;
    for &(_, rows, cols) in &linears {
        bytes += layers as u64
            * q.matrix_bytes(rows, cols).unwrap_or_else(|| {
                kept_dense += layers;
                (rows * cols) as u64 * elem
            });
    }
    // The head is quantized too (a quantized copy of a tied embedding); the embedding stays dense. A tied head
    // that cannot be quantized reads the embedding itself.
    bytes += match (q.matrix_bytes(v, h), cfg.tie_word_embeddings) {
        (Some(b), _) => b,
        (None, tied) => {
            kept_dense += 1;
            if tied {
                0
            } else {
                (v * h) as u64 * elem
            }
        }
    };
    let linear_params: u64 = linears.iter().map(|&(_, o, i)| (o * i) as u64).sum::<u64>() * layers as u64;
    let head_params = if cfg.tie_word_embeddings { 0 } else { (v * h) as u64 };
    // Everything else (embedding, norms, biases) stays in the compute dtype.
    bytes += (params - linear_params - head_params) * elem;
    (bytes, kept_dense)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    /// The estimate equals what a load really holds, for every quantization and tied or untied heads,
    /// including widths that a type cannot take (q4k on 64-wide layers stays dense).
    #[test]
    fn estimate_matches_the_loaded_model() {
        let d = tempfile::tempdir().unwrap();
        for (arch, tied, hidden) in [
            (Architecture::Llama, false, 64),
            (Architecture::Llama, true, 64),
            (Architecture::Llama, true, 256),
            (Architecture::GptNeoX, false, 64),
            (Architecture::StableLm, false, 64),
        ] {
            let mut config = crate::testing::tiny_config(arch, 320);
            config["tie_word_embeddings"] = tied.into();
            config["hidden_size"] = hidden.into();
            let path = d.path().join(format!("{}-{tied}-{hidden}.json", arch.name()));
            std::fs::write(&path, config.to_string()).unwrap();
            let name = path.to_str().unwrap();
            for q in [None, Some(Quantize::Q8_0), Some(Quantize::Q4_0), Some(Quantize::Q4K)] {
                let opts = LoadOptions {
                    device: Some(super::super::DeviceSpec::Cpu),
                    quantize: q,
                    random_weights: true,
                    ..Default::default()
                };
                let info = inspect(name, &opts).unwrap();
                let loaded = crate::load::load(name, &opts).unwrap();
                let what = format!("{} tied={tied} hidden={hidden} {q:?}", arch.name());
                assert_eq!(info.weights_bytes, loaded.model.weight_bytes() as u64, "{what}");
                assert_eq!(info.kept_dense_weights, loaded.kept_dense.len(), "{what}");
            }
        }
    }
}

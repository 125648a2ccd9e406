//! GGUF files: reading the model configuration from llama.cpp's metadata keys, and writing GGUF files
//! (used to make small test models of our own).

use super::config::{Activation, Architecture, ModelConfig, NormKind, RopeScaling, SUPPORTED_ARCHITECTURES};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::Device;
use std::path::Path;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Open and parse a GGUF header, with errors that name the file.
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || magic != GGUF_MAGIC {
        bail!("{}: not a GGUF file (bad magic {:02x?}, expected \"GGUF\")", path.display(), magic);
    }
    let mut f = std::fs::File::open(path)?;
    gguf_file::Content::read(&mut f).map_err(|e| anyhow::anyhow!("{}: corrupt GGUF file: {e}", path.display()))
}

pub fn meta_str<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    c.metadata.get(key).and_then(|v| v.to_string().ok()).map(|s| s.as_str())
}

pub fn meta_u64(c: &gguf_file::Content, key: &str) -> Option<u64> {
    let v = c.metadata.get(key)?;
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    }
}

pub fn meta_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    match c.metadata.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => meta_u64(c, key).map(|x| x as f64),
    }
}

pub fn meta_bool(c: &gguf_file::Content, key: &str) -> Option<bool> {
    c.metadata.get(key).and_then(|v| v.to_bool().ok())
}

/// The model configuration stored in a GGUF file's metadata.
pub fn config_from_gguf(c: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let arch_name = meta_str(c, "general.architecture")
        .with_context(|| format!("{}: no `general.architecture` in GGUF metadata", path.display()))?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "stablelm" => Architecture::StableLm,
        "gptneox" => Architecture::GptNeoX,
        other => bail!("{}: unsupported architecture `{other}`; supported: {SUPPORTED_ARCHITECTURES}", path.display()),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let need = |k: &str| -> Result<usize> {
        meta_u64(c, &key(k))
            .map(|x| x as usize)
            .with_context(|| format!("{}: GGUF metadata lacks `{}`", path.display(), key(k)))
    };
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_layers = need("block_count")?;
    let num_kv_heads = meta_u64(c, &key("attention.head_count_kv")).map(|x| x as usize).unwrap_or(num_heads);
    let head_dim = meta_u64(c, &key("attention.key_length")).map(|x| x as usize).unwrap_or(hidden_size / num_heads);
    let vocab_size = match c.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => bail!("{}: no `token_embd.weight` tensor", path.display()),
    };
    let rotary_dim = meta_u64(c, &key("rope.dimension_count")).map(|x| x as usize).unwrap_or(head_dim);
    let (norm, norm_eps) = match architecture {
        Architecture::Llama => (NormKind::Rms, meta_f64(c, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5)),
        _ => (NormKind::Layer, meta_f64(c, &key("attention.layer_norm_epsilon")).unwrap_or(1e-5)),
    };
    let rope_scaling = if c.tensor_infos.contains_key("rope_freqs.weight") {
        let mut f = std::fs::File::open(path)?;
        let t = c.tensor(&mut f, "rope_freqs.weight", &Device::Cpu)?.dequantize(&Device::Cpu)?;
        RopeScaling::Factors(t.flatten_all()?.to_vec1::<f32>()?)
    } else {
        RopeScaling::None
    };
    let mut eos_token_ids = vec![];
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta_u64(c, k) {
            if !eos_token_ids.contains(&(id as u32)) {
                eos_token_ids.push(id as u32);
            }
        }
    }
    let has_bias = |n: &str| c.tensor_infos.contains_key(n);
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rope_theta: meta_f64(c, &key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        // llama.cpp's converter permutes llama q/k rows for the interleaved rotary; neox-style models keep HF's.
        rope_interleaved: architecture == Architecture::Llama,
        norm,
        norm_eps,
        activation: match architecture {
            Architecture::GptNeoX => Activation::Gelu,
            _ => Activation::Silu,
        },
        max_position_embeddings: meta_u64(c, &key("context_length")).map(|x| x as usize).unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: has_bias("blk.0.attn_q.bias") || has_bias("blk.0.attn_qkv.bias"),
        attention_out_bias: has_bias("blk.0.attn_output.bias"),
        mlp_bias: has_bias("blk.0.ffn_up.bias"),
        parallel_residual: match architecture {
            Architecture::GptNeoX => meta_bool(c, &key("use_parallel_residual")).unwrap_or(true),
            Architecture::StableLm => !c.tensor_infos.contains_key("blk.0.ffn_norm.weight"),
            Architecture::Llama => false,
        },
        qk_layernorm: false,
        bos_token_id: meta_u64(c, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_ids,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Write a GGUF file atomically (temp file + rename).
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, &Value)],
    tensors: &[(&str, &candle_core::quantized::QTensor)],
) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        gguf_file::write(&mut f, metadata, tensors)?;
        use std::io::Write;
        f.flush()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

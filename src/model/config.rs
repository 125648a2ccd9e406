//! Model configuration: Hugging Face `config.json` (both the transformers 4 and 5 spellings of the rotary
//! settings) or GGUF metadata, turned into one runtime description that every architecture reads. What
//! differs between architectures is read by each architecture's own file (`arch/`).

use crate::formats::gguf::{meta_f64, meta_str, meta_u64};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

pub use super::arch::Architecture;
use super::arch::{ArchTraits, GgufMeta};

/// Llama-3 style frequency-dependent rotary scaling (`rope_type: llama3`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors stored in a GGUF file (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
}

impl Activation {
    /// config.json's `hidden_act`.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            other => bail!("unsupported hidden_act `{other}`"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum NormKind {
    Rms,
    Layer,
}

/// Everything an architecture needs to build itself. One struct for all three keeps `info`, random weights
/// and the loaders architecture-agnostic; fields that an architecture does not use keep their defaults.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// How many leading dimensions of each head are rotated (partial rotary for stablelm / gpt_neox).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// GGUF llama files store q/k rows for the interleaved (GPT-J) rotary layout.
    pub rope_interleaved: bool,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub attention_out_bias: bool,
    pub mlp_bias: bool,
    pub parallel_residual: bool,
    pub qk_layernorm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&value).with_context(|| format!("in model config {}", path.display()))
    }

    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let raw: HfConfig =
            serde_json::from_value(v.clone()).context("config.json does not have the expected fields")?;
        let architecture = Architecture::from_hf(&raw.architectures, raw.model_type.as_deref())?;
        let traits = (architecture.spec().from_hf)(&raw)?;
        let need =
            |field: Option<usize>, name: &str| -> Result<usize> { field.with_context(|| format!("missing `{name}`")) };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 || vocab_size == 0 {
            bail!("hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be positive");
        }
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})");
        }
        // Rotary settings live in `rope_parameters` (transformers 5) or at the top level (transformers 4).
        let rp = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rp_get = |k: &str| rp.and_then(|o| o.get(k));
        let rope_theta =
            rp_get("rope_theta").and_then(Value::as_f64).or(raw.rope_theta).or(raw.rotary_emb_base).unwrap_or(10_000.0);
        let partial = rp_get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .or(raw.partial_rotary_factor)
            .or(raw.rotary_pct)
            .unwrap_or(traits.partial_rotary);
        let rope_type = rp_get("rope_type").or_else(|| rp_get("type")).and_then(Value::as_str);
        let rope_scaling = match rope_type {
            None | Some("default") => RopeScaling::None,
            Some("llama3") => {
                let f = |k: &str| rp_get(k).and_then(Value::as_f64).with_context(|| format!("rope `{k}` missing"));
                RopeScaling::Llama3(Llama3RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                })
            }
            Some(other) => bail!("unsupported rope type `{other}` (supported: default, llama3)"),
        };
        let rotary_dim = ((head_dim as f64) * partial) as usize;
        let eos_token_ids = match &raw.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => vec![],
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: raw.intermediate_size.unwrap_or(4 * hidden_size),
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            ..Self::with_traits(architecture, traits)
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A config with the architecture's traits and every shape still zero (filled in by the readers).
    fn with_traits(architecture: Architecture, t: ArchTraits) -> Self {
        ModelConfig {
            architecture,
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            rotary_dim: 0,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rope_interleaved: t.rope_interleaved,
            norm: t.norm,
            norm_eps: t.norm_eps,
            activation: t.activation,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: t.attention_bias,
            attention_out_bias: t.attention_out_bias,
            mlp_bias: t.mlp_bias,
            parallel_residual: t.parallel_residual,
            qk_layernorm: t.qk_layernorm,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// The model configuration stored in a GGUF file's metadata (`path` names the file in errors).
    pub fn from_gguf(c: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch_name = meta_str(c, "general.architecture")
            .with_context(|| format!("{}: no `general.architecture` in GGUF metadata", path.display()))?;
        let architecture = Architecture::from_gguf(arch_name).with_context(|| path.display().to_string())?;
        let traits = (architecture.spec().from_gguf)(&GgufMeta { content: c, prefix: arch_name });
        let key = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| -> Result<usize> {
            meta_u64(c, &key(k))
                .map(|x| x as usize)
                .with_context(|| format!("{}: GGUF metadata lacks `{}`", path.display(), key(k)))
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let num_layers = need("block_count")?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 {
            bail!("{}: embedding_length, attention.head_count and block_count must be positive", path.display());
        }
        let num_kv_heads = meta_u64(c, &key("attention.head_count_kv")).map(|x| x as usize).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("{}: head_count ({num_heads}) must be a multiple of head_count_kv ({num_kv_heads})", path.display());
        }
        let head_dim = meta_u64(c, &key("attention.key_length")).map(|x| x as usize).unwrap_or(hidden_size / num_heads);
        let vocab_size = match c.tensor_infos.get("token_embd.weight") {
            Some(info) if info.shape.rank() == 2 => info.shape.dims()[0],
            _ => bail!("{}: no 2-D `token_embd.weight` tensor", path.display()),
        };
        let rotary_dim = meta_u64(c, &key("rope.dimension_count")).map(|x| x as usize).unwrap_or(head_dim);
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
        let cfg = ModelConfig {
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
            max_position_embeddings: meta_u64(c, &key("context_length")).map(|x| x as usize).unwrap_or(2048),
            tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
            bos_token_id: meta_u64(c, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
            eos_token_ids,
            ..Self::with_traits(architecture, traits)
        };
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_position_embeddings == 0 {
            bail!("the context length (max_position_embeddings) must be positive");
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            bail!("rotary dimension {} must be even and at most head_dim {}", self.rotary_dim, self.head_dim);
        }
        (self.architecture.spec().validate)(self)
    }

    /// Number of parameters, counted from the shapes (tied embeddings counted once).
    pub fn parameter_count(&self) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let layers = self.num_layers as u64 * (self.architecture.spec().layer_parameters)(self);
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + layers + self.norm_parameters() + head
    }

    /// Parameters of one norm over the hidden size (LayerNorm has a bias).
    pub fn norm_parameters(&self) -> u64 {
        match self.norm {
            NormKind::Rms => self.hidden_size as u64,
            NormKind::Layer => 2 * self.hidden_size as u64,
        }
    }

    /// Parameters of one layer's q/k/v/o projections with their biases.
    pub fn attention_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        h * (q + 2 * kv)
            + q * h
            + if self.attention_bias { q + 2 * kv } else { 0 }
            + if self.attention_out_bias { h } else { 0 }
    }

    /// Bytes of KV cache per token of context at the given element size.
    pub fn kv_bytes_per_token(&self, elem_size: usize) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_size) as u64
    }
}

/// config.json as written by transformers 4 and 5 (fields an architecture may read).
#[derive(Deserialize, Default)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub layer_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rotary_emb_base: Option<f64>,
    pub rotary_pct: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub rope_scaling: Option<serde_json::Map<String, Value>>,
    pub rope_parameters: Option<serde_json::Map<String, Value>>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub use_qkv_bias: Option<bool>,
    pub use_parallel_residual: Option<bool>,
    pub qk_layernorm: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_parameters_are_read() {
        let v: Value = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 100, "head_dim": 8, "num_key_value_heads": 2,
            "eos_token_id": [1, 2], "tie_word_embeddings": true,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3(_)));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rotary_dim, 8);
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let v: Value = serde_json::json!({"architectures": ["MambaForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10});
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("MambaForCausalLM") && e.contains("GPTNeoXForCausalLM"), "{e}");
    }
}

//! Model configuration: Hugging Face `config.json` (both the transformers 4 and 5 spellings of the rotary
//! settings) or GGUF metadata, turned into one runtime description that every architecture reads.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The architectures we implement. Each has its own file under `model/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    Llama,
    StableLm,
    GptNeoX,
}

pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM (llama, TinyLlama, Llama-3.x, SmolLM2), StableLmForCausalLM (stablelm), \
     GPTNeoXForCausalLM (gpt_neox, Pythia)";

impl Architecture {
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::StableLm => "stablelm",
            Architecture::GptNeoX => "gpt_neox",
        }
    }

    fn from_hf(architectures: &[String], model_type: Option<&str>) -> Result<Self> {
        for a in architectures {
            match a.as_str() {
                "LlamaForCausalLM" => return Ok(Architecture::Llama),
                "StableLmForCausalLM" => return Ok(Architecture::StableLm),
                "GPTNeoXForCausalLM" => return Ok(Architecture::GptNeoX),
                _ => {}
            }
        }
        match model_type {
            Some("llama") => Ok(Architecture::Llama),
            Some("stablelm") => Ok(Architecture::StableLm),
            Some("gpt_neox") => Ok(Architecture::GptNeoX),
            _ => {
                let named = if architectures.is_empty() {
                    model_type.unwrap_or("none").to_string()
                } else {
                    architectures.join(", ")
                };
                bail!("unsupported architecture `{named}`; supported: {SUPPORTED_ARCHITECTURES}")
            }
        }
    }
}

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
        let raw: RawHfConfig =
            serde_json::from_value(v.clone()).context("config.json does not have the expected fields")?;
        let architecture = Architecture::from_hf(&raw.architectures, raw.model_type.as_deref())?;
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
            .unwrap_or(match architecture {
                Architecture::StableLm | Architecture::GptNeoX => 0.25,
                Architecture::Llama => 1.0,
            });
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
        let act = raw.hidden_act.as_deref().unwrap_or(match architecture {
            Architecture::GptNeoX => "gelu",
            _ => "silu",
        });
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            other => bail!("unsupported hidden_act `{other}`"),
        };
        let (norm, norm_eps) = match architecture {
            Architecture::Llama => (NormKind::Rms, raw.rms_norm_eps.unwrap_or(1e-6)),
            _ => (NormKind::Layer, raw.layer_norm_eps.unwrap_or(1e-5)),
        };
        let (attention_bias, attention_out_bias) = match architecture {
            Architecture::Llama => (raw.attention_bias.unwrap_or(false), raw.attention_bias.unwrap_or(false)),
            Architecture::StableLm => (raw.use_qkv_bias.unwrap_or(false), false),
            Architecture::GptNeoX => (raw.attention_bias.unwrap_or(true), raw.attention_bias.unwrap_or(true)),
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
            rope_interleaved: false,
            norm,
            norm_eps,
            activation,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias,
            attention_out_bias,
            mlp_bias: match architecture {
                Architecture::GptNeoX => true,
                _ => raw.mlp_bias.unwrap_or(false),
            },
            parallel_residual: raw.use_parallel_residual.unwrap_or(architecture == Architecture::GptNeoX),
            qk_layernorm: raw.qk_layernorm.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            bail!("rotary dimension {} must be even and at most head_dim {}", self.rotary_dim, self.head_dim);
        }
        if self.architecture == Architecture::GptNeoX && self.num_kv_heads != self.num_heads {
            bail!("gpt_neox has no grouped-query attention");
        }
        Ok(())
    }

    /// Number of parameters, counted from the shapes (tied embeddings counted once).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let i = self.intermediate_size as u64;
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let norm = match self.norm {
            NormKind::Rms => h,
            NormKind::Layer => 2 * h,
        };
        let attn = h * (q + 2 * kv)
            + q * h
            + if self.attention_bias { q + 2 * kv } else { 0 }
            + if self.attention_out_bias { h } else { 0 };
        let mlp = match self.architecture {
            Architecture::GptNeoX => 2 * h * i + i + h,
            _ => 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 },
        };
        let qk_norm = if self.qk_layernorm { ((self.num_heads + self.num_kv_heads) * self.head_dim) as u64 } else { 0 };
        let per_layer_norms =
            if self.architecture == Architecture::StableLm && self.parallel_residual { norm } else { 2 * norm };
        let layers = self.num_layers as u64 * (attn + mlp + per_layer_norms + qk_norm);
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + layers + norm + head
    }

    /// Bytes of KV cache per token of context at the given element size.
    pub fn kv_bytes_per_token(&self, elem_size: usize) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_size) as u64
    }
}

#[derive(Deserialize, Default)]
struct RawHfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rotary_emb_base: Option<f64>,
    rotary_pct: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_scaling: Option<serde_json::Map<String, Value>>,
    rope_parameters: Option<serde_json::Map<String, Value>>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_qkv_bias: Option<bool>,
    use_parallel_residual: Option<bool>,
    qk_layernorm: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
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

//! The architectures and their registry. Each architecture is one file that owns everything particular to
//! it: how config.json and GGUF metadata map onto [`ModelConfig`], its tensor names (Hugging Face and GGUF),
//! its layers' forward pass, its default LoRA targets and a tiny test config. The trunk around the layers
//! (embedding, final norm, LM head, masks, cache advance) is written once in `model/mod.rs`.
//!
//! Adding an architecture: write `arch/NAME.rs` with a `SPEC` and a [`Layers`] implementation, then add one
//! line to [`REGISTRY`] (docs/architecture.md walks through it).

pub mod gpt_neox;
pub mod llama;
pub mod stablelm;

use super::cache::KvCache;
use super::config::{Activation, HfConfig, ModelConfig, NormKind};
use super::decode_graph::GraphLayer;
use super::layers::{Ops, Rotary, RowAngles};
use super::linear::Linear;
use super::weights::Weights;
use anyhow::Result;
use candle_core::Tensor;

/// Every architecture we implement. The one line to add for a new one.
pub static REGISTRY: &[&ArchSpec] = &[&llama::SPEC, &stablelm::SPEC, &gpt_neox::SPEC];

/// Hugging Face names of the tensors the trunk loads.
#[derive(Debug)]
pub struct TrunkNames {
    /// The token embedding (`…weight`).
    pub embed: &'static str,
    /// The final norm's module (`.weight`, and `.bias` for LayerNorm, are appended).
    pub final_norm: &'static str,
    /// The output projection's module; absent in files with tied embeddings.
    pub lm_head: &'static str,
    /// The module prefix of layer `i` is `{layers}.{i}`.
    pub layers: &'static str,
}

/// What differs between architectures in the runtime config, decided from config.json or GGUF metadata.
#[derive(Debug, Clone)]
pub struct ArchTraits {
    pub norm: NormKind,
    pub norm_eps: f64,
    pub activation: Activation,
    /// Fraction of each head's dimensions that is rotated.
    pub partial_rotary: f64,
    pub attention_bias: bool,
    pub attention_out_bias: bool,
    pub mlp_bias: bool,
    pub parallel_residual: bool,
    pub qk_layernorm: bool,
    /// GGUF llama files store q/k rows for the interleaved (GPT-J) rotary layout.
    pub rope_interleaved: bool,
}

/// A GGUF file's metadata as an architecture reads it: keys under the file's architecture prefix.
pub struct GgufMeta<'a> {
    pub content: &'a candle_core::quantized::gguf_file::Content,
    pub prefix: &'a str,
}

impl GgufMeta<'_> {
    pub fn f64(&self, key: &str) -> Option<f64> {
        crate::formats::gguf::meta_f64(self.content, &format!("{}.{key}", self.prefix))
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        crate::formats::gguf::meta_bool(self.content, &format!("{}.{key}", self.prefix))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// One architecture: its names, how its config is read, and how its layers are built.
pub struct ArchSpec {
    /// Our short name (`billion info`, results).
    pub name: &'static str,
    /// `architectures` entries of config.json that select it.
    pub hf_architectures: &'static [&'static str],
    /// config.json `model_type`, used when `architectures` names none we know.
    pub hf_model_type: &'static str,
    /// GGUF `general.architecture`.
    pub gguf_architecture: &'static str,
    pub trunk: TrunkNames,
    /// config.json → the architecture-specific settings.
    pub from_hf: fn(&HfConfig) -> Result<ArchTraits>,
    /// GGUF metadata → the architecture-specific settings.
    pub from_gguf: fn(&GgufMeta) -> ArchTraits,
    /// Checks beyond the shared ones (e.g. no grouped-query attention).
    pub validate: fn(&ModelConfig) -> Result<()>,
    /// Parameters of one layer (weights, biases, norms).
    pub layer_parameters: fn(&ModelConfig) -> u64,
    /// One layer's linear weights as (module name, out features, in features), for size estimates.
    pub layer_linears: fn(&ModelConfig) -> Vec<(&'static str, usize, usize)>,
    /// The layers of a model of this architecture.
    pub build: fn(&ModelConfig, &Weights) -> Result<Box<dyn Layers>>,
    /// A layer module name after `{layers}.{i}.` (e.g. `self_attn.q_proj`) → its GGUF name (`attn_q`).
    pub gguf_layer_part: fn(&str) -> Option<&'static str>,
    /// LoRA target modules when `--targets` is not given (peft's defaults for the model type).
    pub default_lora_targets: &'static [&'static str],
    /// config.json of a tiny model (hidden 64, 2 layers, 4 heads) with vocabulary `vocab`, for tests.
    pub tiny_config: fn(usize) -> serde_json::Value,
}

impl std::fmt::Debug for ArchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Which architecture a model is: a handle on its registry entry.
#[derive(Clone, Copy)]
pub struct Architecture(pub &'static ArchSpec);

impl Architecture {
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    pub fn spec(&self) -> &'static ArchSpec {
        self.0
    }

    /// config.json's `architectures` / `model_type` → the architecture.
    pub fn from_hf(architectures: &[String], model_type: Option<&str>) -> Result<Self> {
        let by_class = architectures.iter().find_map(|a| REGISTRY.iter().find(|s| s.hf_architectures.contains(&&**a)));
        let by_type = || model_type.and_then(|t| REGISTRY.iter().find(|s| s.hf_model_type == t));
        match by_class.or_else(by_type) {
            Some(spec) => Ok(Self(spec)),
            None => {
                let named = if architectures.is_empty() {
                    model_type.unwrap_or("none").into()
                } else {
                    architectures.join(", ")
                };
                anyhow::bail!("unsupported architecture `{named}`; supported: {}", supported())
            }
        }
    }

    /// GGUF `general.architecture` → the architecture.
    pub fn from_gguf(name: &str) -> Result<Self> {
        match REGISTRY.iter().find(|s| s.gguf_architecture == name) {
            Some(spec) => Ok(Self(spec)),
            None => anyhow::bail!("unsupported architecture `{name}`; supported: {}", supported()),
        }
    }

    /// The llama.cpp GGUF name of a Hugging Face tensor name of this architecture.
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        let (stem, suffix) = match hf.rsplit_once('.') {
            Some((s, suf @ ("weight" | "bias"))) => (s, suf),
            _ => (hf, "weight"),
        };
        let t = &self.0.trunk;
        let top = if stem == t.embed.trim_end_matches(".weight") {
            Some("token_embd")
        } else if stem == t.final_norm {
            Some("output_norm")
        } else if stem == t.lm_head {
            Some("output")
        } else {
            None
        };
        if let Some(top) = top {
            return Some(format!("{top}.{suffix}"));
        }
        let rest = stem.strip_prefix(t.layers)?.strip_prefix('.')?;
        let (idx, part) = rest.split_once('.')?;
        Some(format!("blk.{idx}.{}.{suffix}", (self.0.gguf_layer_part)(part)?))
    }
}

impl PartialEq for Architecture {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Architecture {}

impl std::fmt::Debug for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

impl serde::Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

/// The supported architectures, for error messages.
pub fn supported() -> String {
    REGISTRY.iter().map(|s| format!("{} ({})", s.hf_architectures.join(", "), s.name)).collect::<Vec<_>>().join(", ")
}

/// What a layer stack sees of one forward pass: the cache it appends to, the new tokens' offset, the mask,
/// the rotary tables and the ops in use.
pub struct Step<'a> {
    pub cache: &'a mut KvCache,
    pub offset: usize,
    pub mask: Option<Tensor>,
    pub rotary: &'a Rotary,
    pub ops: Ops,
    /// Rows of different lengths (or a shared prefix): each row's rotation tables and first own column; else
    /// every row's new tokens sit at `offset..offset + t`.
    pub spans: Option<RowSpans>,
}

/// What attention needs of rows of different lengths, prepared once per forward pass.
pub struct RowSpans {
    pub angles: RowAngles,
    /// u32 `[b]` on the compute device.
    pub starts: Tensor,
}

impl Step<'_> {
    /// Rotate queries `[b, heads, t, d]` at their positions (scaled for attention with fused ops).
    pub fn rotate_query(&self, q: &Tensor) -> candle_core::Result<Tensor> {
        match &self.spans {
            Some(s) => self.rotary.apply_query_at(q, &s.angles),
            None => self.rotary.apply_query(q, self.offset, self.ops),
        }
    }

    /// Attention of layer `layer` over the cache (appending `k`, `v`): see [`layers::attention`].
    pub fn attention(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, layer: usize) -> candle_core::Result<Tensor> {
        let starts = self.spans.as_ref().map(|s| &s.starts);
        crate::model::layers::attention(q, k, v, self.cache, layer, self.mask.as_ref(), self.ops, starts)
    }

    /// Rotate keys `[b, kv_heads, t, d]` at their positions.
    pub fn rotate_key(&self, k: &Tensor) -> candle_core::Result<Tensor> {
        match &self.spans {
            Some(s) => self.rotary.apply_at(k, &s.angles),
            None => self.rotary.apply(k, self.offset, self.ops),
        }
    }
}

/// An architecture's layers: everything between the embedding and the final norm.
pub trait Layers: std::fmt::Debug + Send + Sync {
    /// How many layers there are.
    fn num_layers(&self) -> usize;

    /// Run layer `i` over its input `[b, t, hidden]`; appends the layer's keys and values.
    fn forward_layer(&self, i: usize, x: Tensor, step: &mut Step) -> candle_core::Result<Tensor>;

    /// Run every layer over the embedded input `[b, t, hidden]`; appends each layer's keys and values.
    fn forward(&self, mut x: Tensor, step: &mut Step) -> candle_core::Result<Tensor> {
        for i in 0..self.num_layers() {
            x = self.forward_layer(i, x, step)?;
        }
        Ok(x)
    }

    /// Every linear layer by its module name below the layers prefix (`{i}.self_attn.q_proj`).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// The layers in the shape of the CUDA decode graph (pre-norm, q/k/v/o, gated MLP), where they have it.
    fn graph_layers(&self) -> Option<Vec<GraphLayer<'_>>> {
        None
    }
}

/// Every block's linear layers under their module names (`{i}.{part}`).
pub fn named_linears<'a, B: 'a>(
    blocks: &'a mut [B],
    parts: impl Fn(&'a mut B) -> Vec<(&'static str, &'a mut Linear)>,
) -> Vec<(String, &'a mut Linear)> {
    let mut out = vec![];
    for (i, b) in blocks.iter_mut().enumerate() {
        for (part, l) in parts(b) {
            out.push((format!("{i}.{part}"), l));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_follow_llama_cpp() {
        let l = Architecture::Llama;
        assert_eq!(l.gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(l.gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(), Some("blk.3.attn_q.weight"));
        assert_eq!(l.gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        let n = Architecture::GptNeoX;
        assert_eq!(n.gguf_name("gpt_neox.final_layer_norm.bias").as_deref(), Some("output_norm.bias"));
        assert_eq!(
            n.gguf_name("gpt_neox.layers.0.attention.query_key_value.weight").as_deref(),
            Some("blk.0.attn_qkv.weight")
        );
        assert_eq!(n.gguf_name("embed_out.weight").as_deref(), Some("output.weight"));
        assert_eq!(l.gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn every_architecture_has_a_tiny_config_that_parses() {
        for spec in REGISTRY {
            let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320)).unwrap();
            assert_eq!(cfg.architecture.name(), spec.name);
        }
    }
}

//! Llama family: Llama-2 / TinyLlama, Llama-3.x (rope scaling, head_dim, tied embeddings), SmolLM2, and
//! llama GGUF files. Pre-norm RMSNorm blocks, rotary attention with grouped KV heads, SwiGLU MLP.

use super::{named_linears, ArchSpec, ArchTraits, Architecture, GgufMeta, Layers, Step, TrunkNames};
use crate::model::config::{Activation, HfConfig, ModelConfig, NormKind};
use crate::model::decode_graph::{GraphLayer, QkvLinears};
use crate::model::layers::{gated_down_residual, split_heads, Norm};
use crate::model::linear::Linear;
use crate::model::weights::Weights;
use anyhow::Result;
use candle_core::{Module, Tensor};

pub static SPEC: ArchSpec = ArchSpec {
    name: "llama",
    hf_architectures: &["LlamaForCausalLM"],
    hf_model_type: "llama",
    gguf_architecture: "llama",
    trunk: LLAMA_TRUNK,
    from_hf,
    from_gguf,
    validate: |_| Ok(()),
    layer_parameters,
    layer_linears,
    build: |cfg, w| Ok(Box::new(LlamaLayers::load(cfg, w)?)),
    gguf_layer_part,
    default_lora_targets: &["q_proj", "v_proj"],
    tiny_config,
};

/// Tensor names around the layers of llama-shaped checkpoints (StableLM uses the same).
pub(super) const LLAMA_TRUNK: TrunkNames = TrunkNames {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm",
    lm_head: "lm_head",
    layers: "model.layers",
};

impl Architecture {
    #[allow(non_upper_case_globals)]
    pub const Llama: Architecture = Architecture(&SPEC);
}

fn from_hf(raw: &HfConfig) -> Result<ArchTraits> {
    let activation = Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("silu"))?;
    let bias = raw.attention_bias.unwrap_or(false);
    Ok(ArchTraits {
        norm: NormKind::Rms,
        norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        activation,
        partial_rotary: 1.0,
        attention_bias: bias,
        attention_out_bias: bias,
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        parallel_residual: false,
        qk_layernorm: false,
        rope_interleaved: false,
    })
}

fn from_gguf(m: &GgufMeta) -> ArchTraits {
    ArchTraits {
        norm: NormKind::Rms,
        norm_eps: m.f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        activation: Activation::Silu,
        partial_rotary: 1.0,
        attention_bias: m.has_tensor("blk.0.attn_q.bias"),
        attention_out_bias: m.has_tensor("blk.0.attn_output.bias"),
        mlp_bias: m.has_tensor("blk.0.ffn_up.bias"),
        parallel_residual: false,
        qk_layernorm: false,
        // llama.cpp's converter permutes llama q/k rows for the interleaved rotary.
        rope_interleaved: true,
    }
}

fn layer_parameters(cfg: &ModelConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let mlp = 3 * h * i + if cfg.mlp_bias { 2 * i + h } else { 0 };
    cfg.attention_parameters() + mlp + 2 * cfg.norm_parameters()
}

/// The linear weights of a llama-shaped layer, by module name: (name, out, in).
pub(super) fn layer_linears(cfg: &ModelConfig) -> Vec<(&'static str, usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
    LLAMA_LINEARS.into_iter().zip(shapes).map(|(n, (o, i))| (n, o, i)).collect()
}

pub(super) fn gguf_layer_part(part: &str) -> Option<&'static str> {
    Some(match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

fn tiny_config(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu"
    })
}

/// The linear layers of a llama-shaped block by module name, in the order q, k, v, o, gate, up, down.
pub(super) const LLAMA_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[derive(Debug)]
struct Block {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Norm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug)]
struct LlamaLayers {
    cfg: ModelConfig,
    blocks: Vec<Block>,
}

impl LlamaLayers {
    fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{}.{i}", SPEC.trunk.layers);
            let bias = cfg.attention_bias;
            let mut b = Block {
                attn_norm: w.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                q: w.linear(&format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, bias)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, bias)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, bias)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, cfg.num_heads * hd, cfg.attention_out_bias)?,
                mlp_norm: w.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
            };
            // On the GPU, q/k/v and gate/up side by side: the batched decode step multiplies each set as one.
            if w.device.is_cuda() {
                Linear::place_side_by_side(&mut [&mut b.q, &mut b.k, &mut b.v])?;
                Linear::place_side_by_side(&mut [&mut b.gate, &mut b.up])?;
            }
            blocks.push(b);
        }
        Ok(Self { cfg: cfg.clone(), blocks })
    }
}

impl Layers for LlamaLayers {
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn forward_layer(&self, i: usize, x: Tensor, s: &mut Step) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let blk = &self.blocks[i];
        let hs = blk.attn_norm.forward(&x, s.ops)?;
        let q = s.rotate_query(&split_heads(&blk.q.forward(&hs)?, nh, hd)?)?;
        let k = s.rotate_key(&split_heads(&blk.k.forward(&hs)?, nkv, hd)?)?;
        let v = split_heads(&blk.v.forward(&hs)?, nkv, hd)?;
        let attn = s.attention(&q, &k, &v, i)?;
        let x = blk.o.forward_residual(&attn, &x)?;
        let hs = blk.mlp_norm.forward(&x, s.ops)?;
        let (gate, up) = (blk.gate.forward(&hs)?, blk.up.forward(&hs)?);
        gated_down_residual(&blk.down, (&gate, &up), self.cfg.activation, s.ops, &x)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named_linears(&mut self.blocks, |b| {
            LLAMA_LINEARS
                .into_iter()
                .zip([&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down])
                .collect()
        })
    }

    fn graph_layers(&self) -> Option<Vec<GraphLayer<'_>>> {
        Some(
            self.blocks
                .iter()
                .map(|b| GraphLayer {
                    attn_norm: &b.attn_norm,
                    qkv: QkvLinears::Separate([&b.q, &b.k, &b.v]),
                    o: &b.o,
                    mlp_norm: &b.mlp_norm,
                    gate: Some(&b.gate),
                    up: &b.up,
                    down: &b.down,
                    parallel_residual: false,
                })
                .collect(),
        )
    }
}

//! GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): fused query_key_value laid out per head, partial rotary,
//! LayerNorm with bias, GELU MLP, parallel or sequential residual, untied `embed_out`.

use super::{named_linears, ArchSpec, ArchTraits, Architecture, GgufMeta, Layers, Step, TrunkNames};
use crate::model::config::{Activation, HfConfig, ModelConfig, NormKind};
use crate::model::decode_graph::{GraphLayer, QkvLinears};
use crate::model::layers::{activation, Norm};
use crate::model::linear::Linear;
use crate::model::weights::Weights;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};

pub static SPEC: ArchSpec = ArchSpec {
    name: "gpt_neox",
    hf_architectures: &["GPTNeoXForCausalLM"],
    hf_model_type: "gpt_neox",
    gguf_architecture: "gptneox",
    trunk: TrunkNames {
        embed: "gpt_neox.embed_in.weight",
        final_norm: "gpt_neox.final_layer_norm",
        lm_head: "embed_out",
        layers: "gpt_neox.layers",
    },
    from_hf,
    from_gguf,
    validate,
    layer_parameters,
    layer_linears,
    build: |cfg, w| Ok(Box::new(GptNeoXLayers::load(cfg, w)?)),
    gguf_layer_part,
    default_lora_targets: &["query_key_value"],
    tiny_config,
};

impl Architecture {
    #[allow(non_upper_case_globals)]
    pub const GptNeoX: Architecture = Architecture(&SPEC);
}

fn from_hf(raw: &HfConfig) -> Result<ArchTraits> {
    let bias = raw.attention_bias.unwrap_or(true);
    Ok(ArchTraits {
        norm: NormKind::Layer,
        norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
        activation: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("gelu"))?,
        partial_rotary: 0.25,
        attention_bias: bias,
        attention_out_bias: bias,
        mlp_bias: true,
        parallel_residual: raw.use_parallel_residual.unwrap_or(true),
        qk_layernorm: false,
        rope_interleaved: false,
    })
}

fn from_gguf(m: &GgufMeta) -> ArchTraits {
    ArchTraits {
        norm: NormKind::Layer,
        norm_eps: m.f64("attention.layer_norm_epsilon").unwrap_or(1e-5),
        activation: Activation::Gelu,
        partial_rotary: 0.25,
        attention_bias: m.has_tensor("blk.0.attn_qkv.bias"),
        attention_out_bias: m.has_tensor("blk.0.attn_output.bias"),
        mlp_bias: m.has_tensor("blk.0.ffn_up.bias"),
        parallel_residual: m.bool("use_parallel_residual").unwrap_or(true),
        qk_layernorm: false,
        rope_interleaved: false,
    }
}

fn validate(cfg: &ModelConfig) -> Result<()> {
    if cfg.num_kv_heads != cfg.num_heads {
        bail!("gpt_neox has no grouped-query attention");
    }
    Ok(())
}

fn layer_parameters(cfg: &ModelConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    cfg.attention_parameters() + 2 * h * i + i + h + 2 * cfg.norm_parameters()
}

fn layer_linears(cfg: &ModelConfig) -> Vec<(&'static str, usize, usize)> {
    let (h, i, q) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim);
    vec![
        ("attention.query_key_value", 3 * q, h),
        ("attention.dense", h, q),
        ("mlp.dense_h_to_4h", i, h),
        ("mlp.dense_4h_to_h", h, i),
    ]
}

fn gguf_layer_part(part: &str) -> Option<&'static str> {
    Some(match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "attention.query_key_value" => "attn_qkv",
        "attention.dense" => "attn_output",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    })
}

fn tiny_config(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "layer_norm_eps": 1e-5, "rotary_emb_base": 10000, "rotary_pct": 0.25, "use_parallel_residual": true,
        "max_position_embeddings": 256, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu"
    })
}

#[derive(Debug)]
struct Block {
    input_norm: Norm,
    post_norm: Norm,
    qkv: Linear,
    dense: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug)]
struct GptNeoXLayers {
    cfg: ModelConfig,
    blocks: Vec<Block>,
}

impl GptNeoXLayers {
    fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.norm_eps);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{}.{i}", SPEC.trunk.layers);
            let attn_width = cfg.num_heads * cfg.head_dim;
            blocks.push(Block {
                input_norm: w.layer_norm(&format!("{p}.input_layernorm"), h, eps, true)?,
                post_norm: w.layer_norm(&format!("{p}.post_attention_layernorm"), h, eps, true)?,
                qkv: w.linear(&format!("{p}.attention.query_key_value"), 3 * attn_width, h, cfg.attention_bias)?,
                dense: w.linear(&format!("{p}.attention.dense"), h, attn_width, cfg.attention_out_bias)?,
                up: w.linear(&format!("{p}.mlp.dense_h_to_4h"), cfg.intermediate_size, h, true)?,
                down: w.linear(&format!("{p}.mlp.dense_4h_to_h"), h, cfg.intermediate_size, true)?,
            });
        }
        Ok(Self { cfg: cfg.clone(), blocks })
    }
}

impl Layers for GptNeoXLayers {
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn forward_layer(&self, i: usize, x: Tensor, s: &mut Step) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        let ops = s.ops;
        let blk = &self.blocks[i];
        let hs = blk.input_norm.forward(&x, ops)?;
        // query_key_value rows are grouped per head as [q | k | v] of head_dim each.
        let qkv = blk.qkv.forward(&hs)?.reshape((b, t, nh, 3 * hd))?.transpose(1, 2)?;
        let q = s.rotate_query(&qkv.narrow(3, 0, hd)?)?;
        let k = s.rotate_key(&qkv.narrow(3, hd, hd)?)?;
        let v = qkv.narrow(3, 2 * hd, hd)?.contiguous()?;
        // The residual additions go through the frozen layers' residual form (their outputs are not kept for
        // the backward pass); the same sums as `x + attn + mlp`.
        let x1 = blk.dense.forward_residual(&s.attention(&q, &k, &v, i)?, &x)?;
        let mlp_residual = |input: &Tensor, residual: &Tensor| -> candle_core::Result<Tensor> {
            blk.down.forward_residual(&activation(&blk.up.forward(input)?, self.cfg.activation)?, residual)
        };
        if self.cfg.parallel_residual {
            mlp_residual(&blk.post_norm.forward(&x, ops)?, &x1)
        } else {
            mlp_residual(&blk.post_norm.forward(&x1, ops)?, &x1)
        }
    }

    fn graph_layers(&self) -> Option<Vec<GraphLayer<'_>>> {
        Some(
            self.blocks
                .iter()
                .map(|b| GraphLayer {
                    attn_norm: &b.input_norm,
                    qkv: QkvLinears::PerHead(&b.qkv),
                    o: &b.dense,
                    mlp_norm: &b.post_norm,
                    gate: None,
                    up: &b.up,
                    down: &b.down,
                    parallel_residual: self.cfg.parallel_residual,
                })
                .collect(),
        )
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named_linears(&mut self.blocks, |b| {
            vec![
                ("attention.query_key_value", &mut b.qkv),
                ("attention.dense", &mut b.dense),
                ("mlp.dense_h_to_4h", &mut b.up),
                ("mlp.dense_4h_to_h", &mut b.down),
            ]
        })
    }
}

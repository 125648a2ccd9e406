//! StableLM (`StableLmForCausalLM`, e.g. stablelm-2-1_6b): LayerNorm with bias, partial rotary, optional
//! q/k/v bias, optional per-head q/k LayerNorm and optional parallel residual.

use super::llama::LLAMA_LINEARS;
use super::{named_linears, ArchSpec, ArchTraits, Architecture, GgufMeta, Layers, Step};
use crate::model::config::{Activation, HfConfig, ModelConfig, NormKind};
use crate::model::decode_graph::{GraphLayer, QkvLinears};
use crate::model::layers::{gated_down_residual, split_heads, Norm, Ops};
use crate::model::linear::Linear;
use crate::model::weights::{Init, Weights};
use anyhow::Result;
use candle_core::{Module, Tensor};

pub static SPEC: ArchSpec = ArchSpec {
    name: "stablelm",
    hf_architectures: &["StableLmForCausalLM"],
    hf_model_type: "stablelm",
    gguf_architecture: "stablelm",
    trunk: super::llama::LLAMA_TRUNK,
    from_hf,
    from_gguf,
    validate: |_| Ok(()),
    layer_parameters,
    layer_linears: super::llama::layer_linears,
    build: |cfg, w| Ok(Box::new(StableLmLayers::load(cfg, w)?)),
    // The same module names as llama.
    gguf_layer_part: super::llama::gguf_layer_part,
    default_lora_targets: &["q_proj", "v_proj"],
    tiny_config,
};

impl Architecture {
    #[allow(non_upper_case_globals)]
    pub const StableLm: Architecture = Architecture(&SPEC);
}

fn from_hf(raw: &HfConfig) -> Result<ArchTraits> {
    Ok(ArchTraits {
        norm: NormKind::Layer,
        norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
        activation: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("silu"))?,
        partial_rotary: 0.25,
        attention_bias: raw.use_qkv_bias.unwrap_or(false),
        attention_out_bias: false,
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        parallel_residual: raw.use_parallel_residual.unwrap_or(false),
        qk_layernorm: raw.qk_layernorm.unwrap_or(false),
        rope_interleaved: false,
    })
}

fn from_gguf(m: &GgufMeta) -> ArchTraits {
    ArchTraits {
        norm: NormKind::Layer,
        norm_eps: m.f64("attention.layer_norm_epsilon").unwrap_or(1e-5),
        activation: Activation::Silu,
        partial_rotary: 0.25,
        attention_bias: m.has_tensor("blk.0.attn_q.bias"),
        attention_out_bias: m.has_tensor("blk.0.attn_output.bias"),
        mlp_bias: m.has_tensor("blk.0.ffn_up.bias"),
        parallel_residual: !m.has_tensor("blk.0.ffn_norm.weight"),
        qk_layernorm: false,
        rope_interleaved: false,
    }
}

fn layer_parameters(cfg: &ModelConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let mlp = 3 * h * i + if cfg.mlp_bias { 2 * i + h } else { 0 };
    let qk_norm = if cfg.qk_layernorm { ((cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim) as u64 } else { 0 };
    // A parallel residual block has no post-attention norm.
    let norms = if cfg.parallel_residual { 1 } else { 2 } * cfg.norm_parameters();
    cfg.attention_parameters() + mlp + norms + qk_norm
}

fn tiny_config(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "use_qkv_bias": true, "qk_layernorm": true, "use_parallel_residual": false,
        "max_position_embeddings": 256, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "silu"
    })
}

/// One LayerNorm (no bias) per head, as `StableLmLayerNormPerHead`.
#[derive(Debug)]
struct PerHeadNorm {
    norms: Vec<Norm>,
}

impl PerHeadNorm {
    fn load(w: &Weights, prefix: &str, heads: usize, hd: usize, eps: f64) -> Result<Self> {
        let norms = (0..heads)
            .map(|h| {
                let weight = w.tensor(&format!("{prefix}.norms.{h}.weight"), &[hd], Init::Ones)?;
                Ok(Norm::Layer { weight, bias: None, eps })
            })
            .collect::<Result<_>>()?;
        Ok(Self { norms })
    }

    /// `x`: `[b, heads, t, d]`.
    fn forward(&self, x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
        let parts = self
            .norms
            .iter()
            .enumerate()
            .map(|(h, n)| n.forward(&x.narrow(1, h, 1)?.contiguous()?, ops))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }
}

#[derive(Debug)]
struct Block {
    input_norm: Norm,
    post_norm: Option<Norm>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<PerHeadNorm>,
    k_norm: Option<PerHeadNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug)]
struct StableLmLayers {
    cfg: ModelConfig,
    blocks: Vec<Block>,
}

impl StableLmLayers {
    fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.norm_eps);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{}.{i}", SPEC.trunk.layers);
            let bias = cfg.attention_bias;
            let (q_norm, k_norm) = if cfg.qk_layernorm {
                (
                    Some(PerHeadNorm::load(w, &format!("{p}.self_attn.q_layernorm"), cfg.num_heads, hd, eps)?),
                    Some(PerHeadNorm::load(w, &format!("{p}.self_attn.k_layernorm"), cfg.num_kv_heads, hd, eps)?),
                )
            } else {
                (None, None)
            };
            blocks.push(Block {
                input_norm: w.layer_norm(&format!("{p}.input_layernorm"), h, eps, true)?,
                post_norm: if cfg.parallel_residual {
                    None
                } else {
                    Some(w.layer_norm(&format!("{p}.post_attention_layernorm"), h, eps, true)?)
                },
                q: w.linear(&format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, bias)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, bias)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, bias)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, cfg.num_heads * hd, false)?,
                q_norm,
                k_norm,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, false)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, false)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, false)?,
            });
        }
        Ok(Self { cfg: cfg.clone(), blocks })
    }
}

impl Layers for StableLmLayers {
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn forward_layer(&self, i: usize, x: Tensor, s: &mut Step) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let ops = s.ops;
        let blk = &self.blocks[i];
        let hs = blk.input_norm.forward(&x, ops)?;
        let mut q = split_heads(&blk.q.forward(&hs)?, nh, hd)?;
        let mut k = split_heads(&blk.k.forward(&hs)?, nkv, hd)?;
        if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
            q = qn.forward(&q, ops)?;
            k = kn.forward(&k, ops)?;
        }
        let q = s.rotate_query(&q)?;
        let k = s.rotate_key(&k)?;
        let v = split_heads(&blk.v.forward(&hs)?, nkv, hd)?;
        // The residual additions go through the frozen layers' residual forms (their outputs are not kept
        // for the backward pass); the same sums as `x + attn (+ mlp)`.
        let x1 = blk.o.forward_residual(&s.attention(&q, &k, &v, i)?, &x)?;
        let mlp_residual = |input: &Tensor, residual: &Tensor| -> candle_core::Result<Tensor> {
            let (gate, up) = (blk.gate.forward(input)?, blk.up.forward(input)?);
            gated_down_residual(&blk.down, (&gate, &up), self.cfg.activation, ops, residual)
        };
        match &blk.post_norm {
            None => mlp_residual(&hs, &x1),
            Some(post) => mlp_residual(&post.forward(&x1, ops)?, &x1),
        }
    }

    fn graph_layers(&self) -> Option<Vec<GraphLayer<'_>>> {
        // Per-head q/k LayerNorms (StableLM-2-12B) have no kernel in the graph.
        if self.cfg.qk_layernorm {
            return None;
        }
        Some(
            self.blocks
                .iter()
                .map(|b| GraphLayer {
                    attn_norm: &b.input_norm,
                    qkv: QkvLinears::Separate([&b.q, &b.k, &b.v]),
                    o: &b.o,
                    // Parallel StableLM layers feed the MLP the attention's own normed input.
                    mlp_norm: b.post_norm.as_ref().unwrap_or(&b.input_norm),
                    gate: Some(&b.gate),
                    up: &b.up,
                    down: &b.down,
                    parallel_residual: b.post_norm.is_none(),
                })
                .collect(),
        )
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named_linears(&mut self.blocks, |b| {
            LLAMA_LINEARS
                .into_iter()
                .zip([&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down])
                .collect()
        })
    }
}

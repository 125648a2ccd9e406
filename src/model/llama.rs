//! Llama family: Llama-2 / TinyLlama, Llama-3.x (rope scaling, head_dim, tied embeddings), SmolLM2, and
//! llama GGUF files. Pre-norm RMSNorm blocks, rotary attention with grouped KV heads, SwiGLU MLP.

use super::cache::KvCache;
use super::config::ModelConfig;
use super::graph_decode::{GraphSlot, LlamaParts};
use super::layers::{
    attention, causal_mask_for, gated, named_linears, select_positions, split_heads, Embedding, Norm, Ops, Rotary,
};
use super::linear::Linear;
use super::weights::Weights;
use anyhow::Result;
use candle_core::{Module, Tensor};

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
pub struct Llama {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rotary: Rotary,
    /// The CUDA-graph decode step, built on first use.
    graph: GraphSlot,
}

impl Llama {
    pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            blocks.push(Block {
                attn_norm: w.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                q: w.linear(&format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, bias)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, bias)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, bias)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, cfg.num_heads * hd, cfg.attention_out_bias)?,
                mlp_norm: w.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
            });
        }
        let norm = w.rms_norm("model.norm", h, cfg.norm_eps)?;
        let lm_head = w.lm_head("lm_head", &embed, cfg.vocab_size, h, cfg.tie_word_embeddings)?;
        let rotary = Rotary::new(cfg, w.dtype, &w.device)?;
        Ok(Self { cfg: cfg.clone(), embed, blocks, norm, lm_head, rotary, graph: GraphSlot::default() })
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_logits: bool,
        ops: Ops,
    ) -> candle_core::Result<Tensor> {
        let (batch, t) = ids.dims2()?;
        let offset = cache.len();
        cache.check_room(t)?;
        let mut x = self.embed.forward(ids)?;
        if t == 1 && batch == 1 && ops == Ops::Fused && x.device().is_cuda() {
            if let Some(logits) = self.graph.step(|| self.graph_parts(), &x, cache)? {
                return Ok(logits);
            }
        }
        let mask = causal_mask_for(t, offset, &x, ops)?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        for (i, blk) in self.blocks.iter().enumerate() {
            let hs = blk.attn_norm.forward(&x, ops)?;
            let q = self.rotary.apply_query(&split_heads(&blk.q.forward(&hs)?, nh, hd)?, offset, ops)?;
            let k = self.rotary.apply(&split_heads(&blk.k.forward(&hs)?, nkv, hd)?, offset, ops)?;
            let v = split_heads(&blk.v.forward(&hs)?, nkv, hd)?;
            let attn = attention(&q, &k, &v, cache, i, mask.as_ref(), ops)?;
            x = (x + blk.o.forward(&attn)?)?;
            let hs = blk.mlp_norm.forward(&x, ops)?;
            let gated = gated(&blk.gate.forward(&hs)?, &blk.up.forward(&hs)?, self.cfg.activation, ops)?;
            x = (x + blk.down.forward(&gated)?)?;
        }
        cache.advance(t);
        let x = self.norm.forward(&select_positions(&x, all_logits)?, ops)?;
        self.lm_head.forward(&x)
    }

    fn graph_parts(&self) -> LlamaParts<'_> {
        LlamaParts {
            cfg: &self.cfg,
            layers: self
                .blocks
                .iter()
                .map(|b| (&b.attn_norm, [&b.q, &b.k, &b.v, &b.o], &b.mlp_norm, [&b.gate, &b.up, &b.down]))
                .collect(),
            final_norm: &self.norm,
            lm_head: &self.lm_head,
            inv_freq: self.rotary.inv_freq(),
            interleaved: self.rotary.interleaved(),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        // Adapters may be attached or weights replaced: the decode graph must be rebuilt.
        self.graph.reset();
        named_linears("model.layers", &mut self.blocks, |b| {
            vec![
                ("self_attn.q_proj", &mut b.q),
                ("self_attn.k_proj", &mut b.k),
                ("self_attn.v_proj", &mut b.v),
                ("self_attn.o_proj", &mut b.o),
                ("mlp.gate_proj", &mut b.gate),
                ("mlp.up_proj", &mut b.up),
                ("mlp.down_proj", &mut b.down),
            ]
        })
    }

    /// Bytes of the embedding and (untied) output head.
    pub fn head_bytes(&self) -> usize {
        self.embed.bytes() + if self.cfg.tie_word_embeddings { 0 } else { self.lm_head.weight_bytes() }
    }
}

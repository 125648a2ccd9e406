//! GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): fused query_key_value laid out per head, partial rotary,
//! LayerNorm with bias, GELU MLP, parallel or sequential residual, untied `embed_out`.

use super::cache::KvCache;
use super::config::ModelConfig;
use super::layers::{
    activation, attention, causal_mask_for, named_linears, select_positions, Embedding, Norm, Ops, Rotary,
};
use super::linear::Linear;
use super::weights::Weights;
use anyhow::Result;
use candle_core::{Module, Tensor};

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
pub struct GptNeoX {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rotary: Rotary,
}

impl GptNeoX {
    pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.norm_eps);
        let embed = w.embedding("gpt_neox.embed_in.weight", cfg.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("gpt_neox.layers.{i}");
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
        let norm = w.layer_norm("gpt_neox.final_layer_norm", h, eps, true)?;
        let lm_head = w.lm_head("embed_out", &embed, cfg.vocab_size, h, cfg.tie_word_embeddings)?;
        let rotary = Rotary::new(cfg, w.dtype, &w.device)?;
        Ok(Self { cfg: cfg.clone(), embed, blocks, norm, lm_head, rotary })
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_logits: bool,
        ops: Ops,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.len();
        cache.check_room(t)?;
        let mut x = self.embed.forward(ids)?;
        let mask = causal_mask_for(t, offset, &x, ops)?;
        let (nh, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        for (i, blk) in self.blocks.iter().enumerate() {
            let hs = blk.input_norm.forward(&x, ops)?;
            // query_key_value rows are grouped per head as [q | k | v] of head_dim each.
            let qkv = blk.qkv.forward(&hs)?.reshape((b, t, nh, 3 * hd))?.transpose(1, 2)?;
            let q = self.rotary.apply_query(&qkv.narrow(3, 0, hd)?, offset, ops)?;
            let k = self.rotary.apply(&qkv.narrow(3, hd, hd)?, offset, ops)?;
            let v = qkv.narrow(3, 2 * hd, hd)?.contiguous()?;
            let attn = blk.dense.forward(&attention(&q, &k, &v, cache, i, mask.as_ref(), ops)?)?;
            let mlp = |input: &Tensor| -> candle_core::Result<Tensor> {
                blk.down.forward(&activation(&blk.up.forward(input)?, self.cfg.activation)?)
            };
            x = if self.cfg.parallel_residual {
                let m = mlp(&blk.post_norm.forward(&x, ops)?)?;
                ((&x + attn)? + m)?
            } else {
                let x1 = (&x + attn)?;
                let m = mlp(&blk.post_norm.forward(&x1, ops)?)?;
                (x1 + m)?
            };
        }
        cache.advance(t);
        let x = self.norm.forward(&select_positions(&x, all_logits)?, ops)?;
        self.lm_head.forward(&x)
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named_linears("gpt_neox.layers", &mut self.blocks, |b| {
            vec![
                ("attention.query_key_value", &mut b.qkv),
                ("attention.dense", &mut b.dense),
                ("mlp.dense_h_to_4h", &mut b.up),
                ("mlp.dense_4h_to_h", &mut b.down),
            ]
        })
    }

    /// Bytes of the embedding and (untied) output head.
    pub fn head_bytes(&self) -> usize {
        self.embed.bytes() + if self.cfg.tie_word_embeddings { 0 } else { self.lm_head.weight_bytes() }
    }
}

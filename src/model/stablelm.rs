//! StableLM (`StableLmForCausalLM`, e.g. stablelm-2-1_6b): LayerNorm with bias, partial rotary, optional
//! q/k/v bias, optional per-head q/k LayerNorm and optional parallel residual.

use super::cache::KvCache;
use super::config::ModelConfig;
use super::layers::{
    attention, causal_mask_for, gated, named_linears, select_positions, split_heads, Embedding, Norm, Ops, Rotary,
};
use super::linear::Linear;
use super::weights::{Init, Weights};
use anyhow::Result;
use candle_core::{Module, Tensor};

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
pub struct StableLm {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rotary: Rotary,
}

impl StableLm {
    pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.norm_eps);
        let embed = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
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
        let norm = w.layer_norm("model.norm", h, eps, true)?;
        let lm_head = w.lm_head("lm_head", &embed, cfg.vocab_size, h, cfg.tie_word_embeddings)?;
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
        let (_b, t) = ids.dims2()?;
        let offset = cache.len();
        cache.check_room(t)?;
        let mut x = self.embed.forward(ids)?;
        let mask = causal_mask_for(t, offset, &x, ops)?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        for (i, blk) in self.blocks.iter().enumerate() {
            let hs = blk.input_norm.forward(&x, ops)?;
            let mut q = split_heads(&blk.q.forward(&hs)?, nh, hd)?;
            let mut k = split_heads(&blk.k.forward(&hs)?, nkv, hd)?;
            if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
                q = qn.forward(&q, ops)?;
                k = kn.forward(&k, ops)?;
            }
            let q = self.rotary.apply_query(&q, offset, ops)?;
            let k = self.rotary.apply(&k, offset, ops)?;
            let v = split_heads(&blk.v.forward(&hs)?, nkv, hd)?;
            let attn = blk.o.forward(&attention(&q, &k, &v, cache, i, mask.as_ref(), ops)?)?;
            let mlp = |input: &Tensor| -> candle_core::Result<Tensor> {
                let gated = gated(&blk.gate.forward(input)?, &blk.up.forward(input)?, self.cfg.activation, ops)?;
                blk.down.forward(&gated)
            };
            x = match &blk.post_norm {
                None => (&x + attn)?.add(&mlp(&hs)?)?,
                Some(post) => {
                    let x1 = (&x + attn)?;
                    let m = mlp(&post.forward(&x1, ops)?)?;
                    (x1 + m)?
                }
            };
        }
        cache.advance(t);
        let x = self.norm.forward(&select_positions(&x, all_logits)?, ops)?;
        self.lm_head.forward(&x)
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
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

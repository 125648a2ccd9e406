//! The model core: configuration, weights, the linear seam, the KV cache and one file per architecture.

pub mod autograd;
pub mod cache;
pub mod config;
pub mod device;
pub mod fused;
pub mod gguf;
pub mod gpt_neox;
pub mod graph_decode;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod stablelm;
pub mod weights;

pub use cache::KvCache;
pub use config::{Architecture, ModelConfig};
pub use layers::Ops;
pub use linear::Linear;
pub use loader::{load, LoadOptions, LoadedModel};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use weights::Weights;

#[derive(Debug)]
enum Arch {
    Llama(llama::Llama),
    StableLm(stablelm::StableLm),
    GptNeoX(gpt_neox::GptNeoX),
}

/// A causal language model of any supported architecture.
#[derive(Debug)]
pub struct Model {
    arch: Arch,
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    ops: Ops,
    weight_bytes: usize,
}

impl Model {
    pub fn build(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let arch = match cfg.architecture {
            Architecture::Llama => Arch::Llama(llama::Llama::load(cfg, w)?),
            Architecture::StableLm => Arch::StableLm(stablelm::StableLm::load(cfg, w)?),
            Architecture::GptNeoX => Arch::GptNeoX(gpt_neox::GptNeoX::load(cfg, w)?),
        };
        let mut m =
            Self { arch, cfg: cfg.clone(), device: w.device.clone(), dtype: w.dtype, ops: Ops::Fused, weight_bytes: 0 };
        let head = match &m.arch {
            Arch::Llama(a) => a.head_bytes(),
            Arch::StableLm(a) => a.head_bytes(),
            Arch::GptNeoX(a) => a.head_bytes(),
        };
        m.weight_bytes = head + m.linears_mut().iter().map(|(_, l)| l.weight_bytes()).sum::<usize>();
        Ok(m)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Select fused (inference) or differentiable (training) ops.
    pub fn set_ops(&mut self, ops: Ops) {
        self.ops = ops;
    }

    /// A fresh KV cache sized for this model's context window.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers, self.cfg.max_position_embeddings)
    }

    fn run(&self, ids: &Tensor, cache: &mut KvCache, all: bool) -> candle_core::Result<Tensor> {
        let logits = match &self.arch {
            Arch::Llama(m) => m.forward(ids, cache, all, self.ops),
            Arch::StableLm(m) => m.forward(ids, cache, all, self.ops),
            Arch::GptNeoX(m) => m.forward(ids, cache, all, self.ops),
        }?;
        match self.ops {
            Ops::Fused => logits.to_dtype(DType::F32),
            // Training selects the labelled rows first and casts those (a full f32 copy of every position's
            // logits would be the largest tensor of the step).
            Ops::Differentiable => Ok(logits),
        }
    }

    /// Logits at every given position: `ids` `[b, t]` → `[b, t, vocab]` (f32; in the compute dtype with
    /// `Ops::Differentiable`). Appends to `cache`.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.run(ids, cache, true)
    }

    /// Logits at the last position only: `[b, vocab]` (f32). Appends all of `ids` to `cache`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.run(ids, cache, false)?.squeeze(1)
    }

    /// Convenience: token ids as a `[1, t]` tensor on this model's device.
    pub fn input(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        Tensor::new(ids, &self.device)?.unsqueeze(0)
    }

    /// All linear layers by their Hugging Face module names (the seam LoRA plugs into).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match &mut self.arch {
            Arch::Llama(m) => m.linears_mut(),
            Arch::StableLm(m) => m.linears_mut(),
            Arch::GptNeoX(m) => m.linears_mut(),
        }
    }

    /// Bytes of weights held on the device (quantized sizes where quantized).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

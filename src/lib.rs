//! billion: download, benchmark, chat with, fine-tune and speculatively decode ~1B-parameter LLMs.
//!
//! The data path, each layer importing only those before it: `formats` (safetensors, GGUF) → `hub`
//! (downloads, cache) → `model` (config, layers, linear/quant, adapter, cache, one file per architecture;
//! kernels in `ops`) → `load` (a model name → a ready model) → `tokenizer` / `chat` (templates) →
//! `generation` → `dist` (data-parallel ranks) → tasks (`bench`, `chat`, `finetune`, `speculative`) → reports; `cli` is thin on top.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod dist;
pub mod finetune;
pub mod formats;
pub mod generation;
pub mod hub;
pub mod load;
pub mod model;
pub mod ops;
pub mod speculative;
pub mod testing;
pub mod tokenizer;
pub mod util;

//! billion: download, benchmark, chat with, fine-tune and speculatively decode ~1B-parameter LLMs.
//!
//! The data path: `cli` (one file per subcommand) → `model` (loader, device, linear seam, KV cache, one
//! file per architecture) → `tokenizer` → `generation` (sampling, streaming) → tasks and reports.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod finetune;
pub mod generation;
pub mod hub;
pub mod model;
pub mod speculative;
pub mod testing;
pub mod tokenizer;
pub mod util;

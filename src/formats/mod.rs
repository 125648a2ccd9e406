//! File formats, below everything that reads models: safetensors and GGUF. Imported by `hub`, `tokenizer`
//! and `model`; imports none of them.

pub mod gguf;
pub mod safetensors;

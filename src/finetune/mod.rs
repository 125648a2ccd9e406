//! LoRA fine-tuning: data rendered with the chat template and labelled on answers only (`data`), the
//! causal-LM loss (`loss`), AdamW (`optim`), the training loop with checkpoints and evaluation (`train`),
//! merging into the base weights (`merge`), outputs put in place whole (`files`), and the whole run end to
//! end (`pipeline`). Adapters themselves (PEFT format, attach, merge maths) are `model::adapter`, shared
//! with inference.

pub mod data;
pub mod files;
pub mod loss;
pub mod merge;
pub mod optim;
pub mod pipeline;
pub mod train;

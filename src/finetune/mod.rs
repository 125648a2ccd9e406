//! LoRA fine-tuning: PEFT-format adapters on the model's linear seam, data rendered with the chat template
//! and labelled on answers only, the causal-LM loss through the differentiable path (and through quantized
//! bases), AdamW, checkpoints, evaluation, and merging into the base weights.

pub mod data;
pub mod lora;
pub mod merge;
pub mod optim;
pub mod train;

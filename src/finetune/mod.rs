//! LoRA fine-tuning building blocks: PEFT-format adapters on the model's linear seam, the causal-LM loss over
//! response tokens, gradients through the differentiable path, AdamW, and merging into the base weights.

pub mod lora;

//! Kernels below the model: the fused inference ops (with their CUDA kernels, `kernels/kernels.cu`) and the
//! training ops with hand-written backward passes. They take and return tensors; no model types.

pub mod autograd;
pub mod backward;
pub mod cpu;
pub mod flat;
pub mod fused;
#[cfg(feature = "cuda")]
pub mod launch;

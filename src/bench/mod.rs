//! Benchmarks of a loaded model. `speed` follows llama-bench's definitions (pp = prefill of N prompt
//! tokens in one batch, tg = N single-token decode steps, repeated after a warm-up, mean ± sd).

pub mod datasets;
pub mod humaneval;
pub mod mmlu;
pub mod report;
pub mod speed;

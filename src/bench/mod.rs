//! Benchmarks of a loaded model, shaped as llama-bench is: parameters ([`params`]) → runs ([`run`]) → typed
//! records ([`records`]) → printers ([`report`]: JSON, Markdown, console table, SVG). The evaluators: `speed`
//! follows llama-bench's definitions (pp = prefill of N prompt tokens in one batch, tg = N single-token decode
//! steps, repeated after a warm-up, mean ± sd), `mmlu` and `humaneval` score as the reference harnesses do.

pub mod datasets;
pub mod humaneval;
pub mod mmlu;
pub mod params;
pub mod records;
pub mod report;
pub mod run;
pub mod speed;

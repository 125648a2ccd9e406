//! Typed benchmark records: one [`ModelRecord`] per model × quantization × device, as stored in
//! results/benchmark_results.json (schema in docs/benchmark_results.schema.json) and printed by `--json`.
//!
//! Reading is lenient so that files written by older versions still load: missing fields take their
//! defaults, a number stored as `null` (JSON has no NaN or infinity) reads back as NaN, and fields this
//! version does not know are kept in `extra` and written back unchanged.

use super::humaneval::Outcome;
use super::mmlu::SubjectResult;
use super::speed::Throughput;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// `null` (how serde_json writes a non-finite number) reads as NaN.
pub(crate) fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One model × quantization × device: what was loaded, and the evaluators that ran on it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelRecord {
    /// The model as named on the command line.
    pub name: String,
    /// What the name resolved to.
    pub source: String,
    /// safetensors, gguf or random.
    pub format: String,
    pub architecture: String,
    pub parameters: u64,
    /// The compute dtype.
    pub dtype: String,
    /// "none", "q8_0", … or a GGUF file's main tensor type.
    pub quantization: String,
    pub device: String,
    pub date_unix: u64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub load_s: f64,
    pub weights_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<SpeedRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmlu: Option<MmluRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub humaneval: Option<HumanEvalRecord>,
    /// This model's peak resident memory, from its load to its last step: the kernel's high-water mark reset
    /// before the load (Linux), or the largest resident size sampled after each step where it cannot be reset
    /// (null where the OS does not tell).
    pub peak_rss_bytes: Option<u64>,
    /// The card's memory in use (all processes) at its highest, sampled after each step; null off CUDA.
    pub gpu_memory_peak_bytes: Option<u64>,
    /// Weights that `--quantize` left dense because their rows are not whole blocks of the type (which is why
    /// a q4k run can be bigger than a q8_0 one).
    pub kept_dense: usize,
    /// Ctrl-C stopped this run: the evaluator that was running kept what it had finished (and says so itself),
    /// the ones in `not_run` did not start.
    pub interrupted: bool,
    /// Evaluators asked for but not run because of the interrupt.
    pub not_run: Vec<String>,
    /// Fields this version does not know (from files written by other versions), kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl ModelRecord {
    /// The stable key of a result: the same model, quantization and device replace their earlier result.
    pub fn key(&self) -> String {
        format!("{}|{}|{}", self.name, self.quantization, self.device)
    }
}

/// Prefill and decode throughput as llama-bench measures them, and the time to the first token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeedRecord {
    /// Prompt processing (null when `-p 0`).
    pub prefill: Option<Throughput>,
    /// Token generation (null when `-n 0`).
    pub decode: Option<Throughput>,
    /// One prefill of `prompt_tokens` (at least 1) until the first token, in milliseconds.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttft_ms: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub reps: usize,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Questions, correct answers and accuracy of one MMLU group (or of any set of subjects).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupScore {
    pub questions: usize,
    pub correct: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub accuracy: f64,
}

/// MMLU over the chosen subjects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MmluRecord {
    pub shots: usize,
    pub questions: usize,
    pub correct: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub accuracy: f64,
    /// Mean log-likelihood of the correct answer over all questions.
    #[serde(deserialize_with = "f64_or_nan")]
    pub mean_loglik_correct: f64,
    /// lm-evaluation-harness's groups (stem, humanities, social_sciences, other) that had questions.
    pub groups: BTreeMap<String, GroupScore>,
    pub subjects: Vec<SubjectResult>,
    /// Subject → the predicted choice (0..4) of each question, in order.
    pub predictions: BTreeMap<String, Vec<usize>>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub seconds: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub questions_per_s: f64,
    pub prefix_reuse: bool,
    /// Tokens run through the model (prefix reuse lowers it).
    pub tokens_run: usize,
    /// The most questions scored in one forward pass (1: one at a time).
    pub batch_rows: usize,
    /// Stopped by Ctrl-C: the figures cover the questions answered before it.
    #[serde(skip_serializing_if = "is_false")]
    pub interrupted: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// HumanEval: generated completions run in the sandbox, scored with the unbiased pass@k estimator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HumanEvalRecord {
    /// Problems with at least one completion.
    pub problems: usize,
    /// Completions per problem asked for.
    pub samples: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub temperature: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub pass_at_1: f64,
    /// Mean over the problems with at least 10 completions; null when none has.
    pub pass_at_10: Option<f64>,
    pub per_problem: Vec<ProblemRecord>,
    /// How the model was asked: "base" (the prompt continued) or "instruct" (the prompt sent as a chat message,
    /// the code taken from the reply).
    pub mode: String,
    /// How far the programs were isolated.
    pub sandbox: String,
    /// Completions decoded together (a refilled batch).
    pub batch_rows: usize,
    /// Wall time of generating every completion, and of running the programs.
    #[serde(deserialize_with = "f64_or_nan")]
    pub generation_seconds: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub run_seconds: f64,
    /// Tokens generated over all completions, per second of generation.
    pub generated_tokens: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub generation_tok_s: f64,
    /// Stopped by Ctrl-C: the figures cover the problems whose completions were generated and run before it.
    #[serde(skip_serializing_if = "is_false")]
    pub interrupted: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One HumanEval problem's completions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProblemRecord {
    pub task_id: String,
    pub samples: usize,
    pub passed: usize,
    pub outcomes: Vec<Outcome>,
    /// The first completion (in instruct mode the whole reply).
    pub completion: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_sections_are_absent_and_memory_is_null() {
        let r =
            ModelRecord { name: "m".into(), quantization: "none".into(), device: "cpu".into(), ..Default::default() };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in ["speed", "mmlu", "humaneval"] {
            assert!(!keys.contains(&k), "{k} absent when not run");
        }
        assert!(v["peak_rss_bytes"].is_null() && v.as_object().unwrap().contains_key("gpu_memory_peak_bytes"));
        assert_eq!(r.key(), "m|none|cpu");
    }

    #[test]
    fn older_records_load_and_keep_unknown_fields() {
        // No gpu_memory_peak_bytes (older files), a NaN written as null, and a field from elsewhere.
        let old = json!({
            "name": "a", "source": "/x", "format": "gguf", "architecture": "llama", "parameters": 10,
            "dtype": "f32", "quantization": "q8_0", "device": "cpu", "date_unix": 5, "load_s": 0.5,
            "weights_bytes": 100, "peak_rss_bytes": 7, "note": {"by": "hand"},
            "mmlu": {"shots": 5, "questions": 2, "correct": 1, "accuracy": 0.5, "mean_loglik_correct": null,
                     "groups": {"stem": {"questions": 2, "correct": 1, "accuracy": 0.5}},
                     "subjects": [{"subject": "anatomy", "group": "stem", "questions": 2, "correct": 1,
                                   "accuracy": 0.5, "mean_loglik_correct": -1.0}],
                     "questions_per_s": 3.0},
            "humaneval": {"problems": 1, "samples": 1, "temperature": 0.0, "pass_at_1": 1.0, "pass_at_10": null,
                          "per_problem": [{"task_id": "t/0", "samples": 1, "passed": 1,
                                           "outcomes": [{"status": "passed"}, {"status": "failed", "error": "E"},
                                                        {"status": "timed_out"}],
                                           "completion": "x"}]}
        });
        let r: ModelRecord = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(r.gpu_memory_peak_bytes, None);
        let m = r.mmlu.as_ref().unwrap();
        assert!(m.mean_loglik_correct.is_nan() && !m.prefix_reuse && m.predictions.is_empty());
        assert_eq!(m.groups["stem"].correct, 1);
        let h = r.humaneval.as_ref().unwrap();
        assert_eq!(h.per_problem[0].outcomes, [Outcome::Passed, Outcome::Failed("E".into()), Outcome::TimedOut]);
        assert_eq!(r.extra["note"], json!({"by": "hand"}));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["note"], old["note"]);
        assert_eq!(back["humaneval"]["per_problem"], old["humaneval"]["per_problem"]);
        assert!(back["mmlu"]["mean_loglik_correct"].is_null());
    }
}

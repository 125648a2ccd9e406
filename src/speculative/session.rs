//! A speculative run over a set of prompts, as `billion speculative` does it: each prompt decoded by the
//! draft/target pair (and by the target alone for the speedup), per-prompt records, and one typed record of
//! the whole setting for the results file.

use super::{check_compatible, theoretical_speedup, AcceptRule, SpecParams, SpecStats, SpeculativeDecoder};
use crate::generation::{generate, sampling::SamplingParams, GenerateParams};
use crate::load::device::{device_name, dtype_name};
use crate::load::LoadedModel;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// The JSON pointers that tell two settings apart in the results file: one record per setting, replaced when
/// the same setting runs again (the two models as loaded — dtype, quantization — are part of it).
pub const RESULTS_KEY: &[&str] = &[
    "/draft",
    "/target",
    "/k",
    "/adaptive",
    "/temperature",
    "/top_k",
    "/top_p",
    "/prompt_set",
    "/device",
    "/draft_setup",
    "/target_setup",
];

/// Prompts from a file: one per line (`\n` written as the two characters `\` `n`), or JSON lines with a
/// `"prompt"` field; blank lines are skipped. Errors name the line.
pub fn read_prompts_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p = if line.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: line {} is not JSON", path.display(), n + 1))?;
            v.get("prompt")
                .and_then(|p| p.as_str())
                .with_context(|| format!("{}: line {} has no \"prompt\"", path.display(), n + 1))?
                .to_string()
        } else {
            line.replace("\\n", "\n")
        };
        out.push(p);
    }
    if out.is_empty() {
        bail!("{}: no prompts (only blank lines)", path.display());
    }
    Ok(out)
}

/// What one run needs besides the models and prompts.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The names the models were given (kept in the record).
    pub draft: String,
    pub target: String,
    pub k: usize,
    pub adaptive: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Also decode each prompt with the target alone (speedup and cost ratio).
    pub baseline: bool,
    /// The prompts file, or "single".
    pub prompt_set: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptStats {
    pub acceptance_rate: f64,
    pub per_position: Vec<f64>,
    pub tokens_per_round: f64,
    pub accepted_per_round: f64,
    pub rounds: usize,
    pub draft_seconds: f64,
    pub target_seconds: f64,
    pub tok_s: f64,
    pub target_only_tok_s: Option<f64>,
    pub speedup: Option<f64>,
    /// Draft step time over target step time (NaN without the baseline run).
    pub cost_ratio: f64,
    pub theoretical_speedup: f64,
}

/// One prompt's result.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRecord {
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stats: PromptStats,
}

/// How one side was loaded: what tells two settings of the same models apart.
#[derive(Debug, Clone, Serialize)]
pub struct SideSetup {
    pub format: &'static str,
    pub dtype: &'static str,
    pub quantization: String,
}

impl SideSetup {
    fn of(m: &LoadedModel) -> Self {
        Self { format: m.format, dtype: dtype_name(m.model.dtype()), quantization: m.quantization.clone() }
    }
}

/// The whole setting over all prompts: one entry of the results file.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub draft: String,
    pub target: String,
    pub k: usize,
    pub adaptive: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub prompt_set: String,
    pub prompts: usize,
    pub max_tokens: usize,
    pub draft_setup: SideSetup,
    pub target_setup: SideSetup,
    pub device: String,
    pub acceptance_rate: f64,
    pub per_position: Vec<f64>,
    pub tokens_per_round: f64,
    pub accepted_per_round: f64,
    pub tok_s: f64,
    pub target_only_tok_s: Option<f64>,
    pub speedup: Option<f64>,
    pub cost_ratio: f64,
    pub theoretical_speedup: f64,
    pub draft_seconds: f64,
    pub target_seconds: f64,
    pub unix_time: u64,
}

/// Decode every prompt (token ids) with the pair, calling `on_prompt` as each finishes, and return the
/// setting's record. The models must tokenize alike (checked).
pub fn run(
    draft: &LoadedModel,
    target: &LoadedModel,
    prompts: &[(String, Vec<u32>)],
    s: &RunSettings,
    mut on_prompt: impl FnMut(&PromptRecord) -> Result<()>,
) -> Result<RunRecord> {
    let vocab = check_compatible((&draft.model, draft.tokenizer.as_ref()), (&target.model, target.tokenizer.as_ref()))?;
    let eos = target.eos_ids();
    let mut totals = SpecStats::default();
    let (mut base_tokens, mut base_seconds) = (0usize, 0f64);
    let mut cost_ratios = vec![];
    for (text, ids) in prompts {
        let params = SpecParams {
            k: s.k,
            adaptive: s.adaptive,
            max_tokens: s.max_tokens,
            sampling: s.sampling.clone(),
            eos_ids: eos.clone(),
            rule: AcceptRule::Correct,
        };
        let mut dec = SpeculativeDecoder::new(&draft.model, &target.model, vocab, ids, params)?;
        let out = dec.run()?;
        let st = dec.stats.clone();
        let out_text = match target.tokenizer.as_ref() {
            Some(t) => t.decode(&out, true)?,
            None => String::new(),
        };
        // The target alone: its tokens/s, and its time per decode step (for the cost ratio).
        let baseline = if s.baseline {
            let gp = GenerateParams::new(s.max_tokens, s.sampling.clone(), eos.clone());
            let g = generate(&target.model, None, ids, &mut target.model.new_cache(), &gp, |_| {})?;
            let secs = g.prefill_seconds + g.decode_seconds;
            base_tokens += g.tokens.len();
            base_seconds += secs;
            Some((
                g.tokens.len() as f64 / secs.max(1e-9),
                g.decode_seconds / g.tokens.len().saturating_sub(1).max(1) as f64,
            ))
        } else {
            None
        };
        let cost_ratio = match baseline {
            Some((_, t_step)) if st.draft_forwards > 0 => {
                (st.draft_seconds / st.draft_forwards as f64) / t_step.max(1e-9)
            }
            _ => f64::NAN,
        };
        if cost_ratio.is_finite() {
            cost_ratios.push(cost_ratio);
        }
        let record = PromptRecord {
            prompt: text.clone(),
            prompt_tokens: ids.clone(),
            tokens: out,
            text: out_text,
            stats: PromptStats {
                acceptance_rate: st.acceptance_rate(),
                per_position: st.per_position_rates(),
                tokens_per_round: st.tokens_per_round(),
                accepted_per_round: st.accepted_per_round(),
                rounds: st.rounds,
                draft_seconds: st.draft_seconds,
                target_seconds: st.target_seconds,
                tok_s: st.tok_s(),
                target_only_tok_s: baseline.map(|b| b.0),
                speedup: baseline.map(|b| st.tok_s() / b.0),
                cost_ratio,
                theoretical_speedup: theoretical_speedup(st.acceptance_rate(), s.k, cost_ratio),
            },
        };
        on_prompt(&record)?;
        totals.add(&st);
    }
    let alpha = totals.acceptance_rate();
    let base_tok_s = (base_tokens > 0).then(|| base_tokens as f64 / base_seconds);
    let c = if cost_ratios.is_empty() { f64::NAN } else { cost_ratios.iter().sum::<f64>() / cost_ratios.len() as f64 };
    Ok(RunRecord {
        draft: s.draft.clone(),
        target: s.target.clone(),
        k: s.k,
        adaptive: s.adaptive,
        temperature: s.sampling.temperature,
        top_k: s.sampling.top_k,
        top_p: s.sampling.top_p,
        prompt_set: s.prompt_set.clone(),
        prompts: prompts.len(),
        max_tokens: s.max_tokens,
        draft_setup: SideSetup::of(draft),
        target_setup: SideSetup::of(target),
        device: device_name(target.model.device()),
        acceptance_rate: alpha,
        per_position: totals.per_position_rates(),
        tokens_per_round: totals.tokens_per_round(),
        accepted_per_round: totals.accepted_per_round(),
        tok_s: totals.tok_s(),
        target_only_tok_s: base_tok_s,
        speedup: base_tok_s.map(|b| totals.tok_s() / b),
        cost_ratio: c,
        theoretical_speedup: theoretical_speedup(alpha, s.k, c),
        draft_seconds: totals.draft_seconds,
        target_seconds: totals.target_seconds,
        unix_time: crate::util::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_file_lines_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.txt");
        std::fs::write(&p, "first\\nline\n\n{\"prompt\": \"second\"}\n").unwrap();
        assert_eq!(read_prompts_file(&p).unwrap(), vec!["first\nline".to_string(), "second".to_string()]);
        std::fs::write(&p, "ok\n{\"text\": 1}\n").unwrap();
        assert!(read_prompts_file(&p).unwrap_err().to_string().contains("line 2 has no \"prompt\""));
        std::fs::write(&p, "\n  \n").unwrap();
        assert!(read_prompts_file(&p).unwrap_err().to_string().contains("no prompts"));
    }
}

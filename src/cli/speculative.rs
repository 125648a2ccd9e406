//! `billion speculative`: draft/target speculative decoding with acceptance statistics and the speedup over
//! the target alone; results kept in results/speculative_results.json.

use super::args::load_flagged;
use super::{DeviceArgs, SamplingArgs};
use crate::generation::{generate, GenerateParams};
use crate::load::{parse_dtype, LoadOptions, LoadedModel};
use crate::model::quant::QuantizeChoice;
use crate::speculative::{check_compatible, theoretical_speedup, AcceptRule, SpecParams, SpeculativeDecoder};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SpeculativeArgs {
    /// Draft model (anything --model takes)
    #[arg(long)]
    pub draft: String,
    /// Target model (anything --model takes)
    #[arg(long)]
    pub target: String,
    /// Prompt text (BOS is added when the target's tokenizer adds one)
    #[arg(long, short = 'p', conflicts_with_all = ["prompt_ids", "prompts"])]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given
    #[arg(long, value_delimiter = ',', conflicts_with = "prompts")]
    pub prompt_ids: Option<Vec<u32>>,
    /// A file of prompts: one per line, or JSON lines with a "prompt" field
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Draft tokens per round (at least 1)
    #[arg(long, default_value_t = 4, value_parser = super::args::positive)]
    pub k: usize,
    /// Let the draft length follow the acceptance rate
    #[arg(long)]
    pub adaptive: bool,
    /// Most tokens to generate per prompt
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or metal (default: CUDA, then Metal, then CPU), for both models
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<crate::load::DeviceSpec>,
    /// The draft's compute dtype: f32, f16 or bf16 (default as for --dtype elsewhere)
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    pub draft_dtype: Option<DType>,
    /// The target's compute dtype: f32, f16 or bf16
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    pub target_dtype: Option<DType>,
    /// Quantize the draft's safetensors weights at load: none, q8_0, q4_0 or q4k
    #[arg(long, value_name = "TYPE")]
    pub draft_quantize: Option<QuantizeChoice>,
    /// Quantize the target's safetensors weights at load: none, q8_0, q4_0 or q4k
    #[arg(long, value_name = "TYPE")]
    pub target_quantize: Option<QuantizeChoice>,
    /// GGUF draft: expand to dense weights
    #[arg(long)]
    pub draft_dequantize: bool,
    /// GGUF target: expand to dense weights (e.g. a quantized model drafting for its full-precision self)
    #[arg(long)]
    pub target_dequantize: bool,
    /// Both models from config.json shapes with random weights
    #[arg(long)]
    pub random_weights: bool,
    /// Do not add BOS to text prompts
    #[arg(long)]
    pub no_bos: bool,
    /// Skip the target-only comparison run
    #[arg(long)]
    pub no_baseline: bool,
    /// Where to keep the results
    #[arg(long, default_value = "results/speculative_results.json")]
    pub results: PathBuf,
    /// One JSON object per prompt on stdout
    #[arg(long)]
    pub json: bool,
}

fn load_side(
    model: &str,
    a: &SpeculativeArgs,
    dtype: Option<DType>,
    q: Option<QuantizeChoice>,
    dequantize: bool,
) -> Result<LoadedModel> {
    let device = DeviceArgs { device: a.device, dtype };
    let opts = LoadOptions {
        device: device.device,
        dtype: device.dtype,
        quantize: q.and_then(|q| q.0),
        random_weights: a.random_weights,
        dequantize,
    };
    load_flagged(model, &opts)
}

pub fn run(a: SpeculativeArgs) -> Result<()> {
    let sampling = a.sampling.params()?;
    check_results_file(&a.results).context("--results")?;
    let draft = load_side(&a.draft, &a, a.draft_dtype, a.draft_quantize, a.draft_dequantize).context("--draft")?;
    let target =
        load_side(&a.target, &a, a.target_dtype, a.target_quantize, a.target_dequantize).context("--target")?;
    let vocab = check_compatible((&draft.model, draft.tokenizer.as_ref()), (&target.model, target.tokenizer.as_ref()))?;
    let tok = target.tokenizer.as_ref();
    let prompts: Vec<(String, Vec<u32>)> = match (&a.prompt, &a.prompt_ids, &a.prompts) {
        (Some(p), _, _) => vec![(p.clone(), target.tokenizer()?.encode(p, !a.no_bos)?)],
        (_, Some(ids), _) => vec![(String::new(), ids.clone())],
        (_, _, Some(file)) => {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("--prompts: cannot read {}", file.display()))?;
            let mut out = vec![];
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let p = if line.trim_start().starts_with('{') {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .with_context(|| format!("--prompts {}: line {} is not JSON", file.display(), n + 1))?;
                    v.get("prompt")
                        .and_then(|p| p.as_str())
                        .with_context(|| format!("--prompts {}: line {} has no \"prompt\"", file.display(), n + 1))?
                        .to_string()
                } else {
                    line.replace("\\n", "\n")
                };
                let ids = target.tokenizer()?.encode(&p, !a.no_bos)?;
                out.push((p, ids));
            }
            out
        }
        _ => bail!("give --prompt, --prompt-ids or --prompts"),
    };
    let eos = target.eos_ids();
    let mut totals = crate::speculative::SpecStats::default();
    let mut base_tokens = 0usize;
    let mut base_seconds = 0f64;
    let mut per_prompt = vec![];
    for (text, ids) in &prompts {
        let params = SpecParams {
            k: a.k,
            adaptive: a.adaptive,
            max_tokens: a.max_tokens,
            sampling: sampling.clone(),
            eos_ids: eos.clone(),
            rule: AcceptRule::Correct,
        };
        let mut dec = SpeculativeDecoder::new(&draft.model, &target.model, vocab, ids, params)?;
        let out = dec.run()?;
        let s = dec.stats.clone();
        let out_text = match tok {
            Some(t) => t.decode(&out, true)?,
            None => String::new(),
        };
        let mut baseline = None;
        if !a.no_baseline {
            let gp = GenerateParams::new(a.max_tokens, sampling.clone(), eos.clone());
            let mut cache = target.model.new_cache();
            let g = generate(&target.model, None, ids, &mut cache, &gp, |_| {})?;
            let secs = g.prefill_seconds + g.decode_seconds;
            base_tokens += g.tokens.len();
            base_seconds += secs;
            baseline = Some((
                g.tokens.len() as f64 / secs.max(1e-9),
                g.decode_seconds / g.tokens.len().saturating_sub(1).max(1) as f64,
            ));
        }
        let c = match baseline {
            Some((_, t_step)) if s.draft_forwards > 0 => (s.draft_seconds / s.draft_forwards as f64) / t_step.max(1e-9),
            _ => f64::NAN,
        };
        let v = serde_json::json!({
            "prompt": text, "prompt_tokens": ids, "tokens": out, "text": out_text,
            "stats": {
                "acceptance_rate": s.acceptance_rate(), "per_position": s.per_position_rates(),
                "tokens_per_round": s.tokens_per_round(), "accepted_per_round": s.accepted_per_round(), "rounds": s.rounds, "draft_seconds": s.draft_seconds,
                "target_seconds": s.target_seconds, "tok_s": s.tok_s(),
                "target_only_tok_s": baseline.map(|b| b.0), "speedup": baseline.map(|b| s.tok_s() / b.0),
                "cost_ratio": c, "theoretical_speedup": theoretical_speedup(s.acceptance_rate(), a.k, c),
            }
        });
        if a.json {
            println!("{v}");
        } else {
            println!("{out_text}");
            eprintln!(
                "[α {:.3}, {:.2} tokens/round, {:.1} tok/s{}]",
                s.acceptance_rate(),
                s.tokens_per_round(),
                s.tok_s(),
                baseline
                    .map(|b| format!(", target alone {:.1} tok/s, speedup {:.2}x", b.0, s.tok_s() / b.0))
                    .unwrap_or_default()
            );
        }
        accumulate(&mut totals, &s);
        per_prompt.push(v);
    }
    let alpha = totals.acceptance_rate();
    let base_tok_s = (base_tokens > 0).then(|| base_tokens as f64 / base_seconds);
    let c_all: Vec<f64> =
        per_prompt.iter().filter_map(|v| v["stats"]["cost_ratio"].as_f64()).filter(|c| c.is_finite()).collect();
    let c = if c_all.is_empty() { f64::NAN } else { c_all.iter().sum::<f64>() / c_all.len() as f64 };
    let record = serde_json::json!({
        "draft": a.draft, "target": a.target, "k": a.k, "adaptive": a.adaptive, "temperature": sampling.temperature,
        "top_k": sampling.top_k, "top_p": sampling.top_p, "prompt_set": a.prompts.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "single".into()),
        "prompts": prompts.len(), "max_tokens": a.max_tokens,
        "draft_setup": side_setup(&draft), "target_setup": side_setup(&target), "device": crate::load::device::device_name(target.model.device()),
        "acceptance_rate": alpha, "per_position": totals.per_position_rates(), "tokens_per_round": totals.tokens_per_round(), "accepted_per_round": totals.accepted_per_round(),
        "tok_s": totals.tok_s(), "target_only_tok_s": base_tok_s, "speedup": base_tok_s.map(|b| totals.tok_s() / b),
        "cost_ratio": c, "theoretical_speedup": theoretical_speedup(alpha, a.k, c),
        "draft_seconds": totals.draft_seconds, "target_seconds": totals.target_seconds,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    save_results(&a.results, record)?;
    Ok(())
}

fn accumulate(t: &mut crate::speculative::SpecStats, s: &crate::speculative::SpecStats) {
    t.rounds += s.rounds;
    t.drafted += s.drafted;
    t.accepted += s.accepted;
    t.tokens += s.tokens;
    t.seconds += s.seconds;
    t.draft_seconds += s.draft_seconds;
    t.target_seconds += s.target_seconds;
    t.draft_forwards += s.draft_forwards;
    t.target_forwards += s.target_forwards;
    for (i, (acc, tried)) in s.per_position.iter().enumerate() {
        if t.per_position.len() <= i {
            t.per_position.push((0, 0));
        }
        t.per_position[i].0 += acc;
        t.per_position[i].1 += tried;
    }
}

/// Keep one record per (draft, target, k, adaptive, sampling, prompt set); replace it when run again.
/// How one side was loaded: what tells two settings of the same models apart.
fn side_setup(m: &LoadedModel) -> serde_json::Value {
    serde_json::json!({
        "format": m.format,
        "dtype": crate::load::device::dtype_name(m.model.dtype()),
        "quantization": m.quantization,
    })
}

/// Before any work: the results file can be written, and an existing one is a results file (a `runs` list).
fn check_results_file(path: &std::path::Path) -> Result<()> {
    super::args::check_output_file(path)?;
    if let Ok(text) = std::fs::read_to_string(path) {
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not a JSON results file", path.display()))?;
        if !v.get("runs").is_some_and(|r| r.is_array()) {
            bail!("{} has no `runs` list: not a results file of this command", path.display());
        }
    }
    Ok(())
}

fn save_results(path: &std::path::Path, record: serde_json::Value) -> Result<()> {
    // One record per setting: the two models as loaded (dtype, quantization) are part of the key.
    let key = [
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
    crate::util::save_run(path, record, &key)
}

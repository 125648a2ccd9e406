//! `billion speculative`: draft/target speculative decoding with acceptance statistics and the speedup over
//! the target alone; results kept in results/speculative_results.json.

use super::args::load_flagged;
use super::{DeviceArgs, SamplingArgs};
use crate::load::{parse_dtype, LoadOptions, LoadedModel};
use crate::model::quant::QuantizeChoice;
use crate::speculative::session;
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
    crate::util::check_results_file(&a.results).context("--results")?;
    // Every input is read before the models load.
    let texts: Option<Vec<String>> = match (&a.prompt, &a.prompt_ids, &a.prompts) {
        (Some(p), _, _) => Some(vec![p.clone()]),
        (_, Some(_), _) => None,
        (_, _, Some(file)) => Some(session::read_prompts_file(file).context("--prompts")?),
        _ => bail!("give --prompt, --prompt-ids or --prompts"),
    };
    let draft = load_side(&a.draft, &a, a.draft_dtype, a.draft_quantize, a.draft_dequantize).context("--draft")?;
    let target =
        load_side(&a.target, &a, a.target_dtype, a.target_quantize, a.target_dequantize).context("--target")?;
    let prompts: Vec<(String, Vec<u32>)> = match (texts, &a.prompt_ids) {
        (Some(texts), _) => {
            let tok = target.tokenizer()?;
            texts.into_iter().map(|t| Ok((t.clone(), tok.encode(&t, !a.no_bos)?))).collect::<Result<_>>()?
        }
        (None, Some(ids)) => {
            let vocab = target.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!("--prompt-ids: token id {bad} is out of range for a vocabulary of {vocab}");
            }
            vec![(String::new(), ids.clone())]
        }
        (None, None) => unreachable!("one prompt source is required above"),
    };
    let settings = session::RunSettings {
        draft: a.draft.clone(),
        target: a.target.clone(),
        k: a.k,
        adaptive: a.adaptive,
        max_tokens: a.max_tokens,
        sampling,
        baseline: !a.no_baseline,
        prompt_set: a.prompts.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "single".into()),
    };
    let record = session::run(&draft, &target, &prompts, &settings, |p| {
        if a.json {
            println!("{}", serde_json::to_string(p)?);
        } else {
            println!("{}", p.text);
            let s = &p.stats;
            eprintln!(
                "[α {:.3}, {:.2} tokens/round, {:.1} tok/s{}]",
                s.acceptance_rate,
                s.tokens_per_round,
                s.tok_s,
                s.target_only_tok_s
                    .map(|b| format!(", target alone {b:.1} tok/s, speedup {:.2}x", s.tok_s / b))
                    .unwrap_or_default()
            );
        }
        Ok(())
    })?;
    crate::util::save_run(&a.results, serde_json::to_value(&record)?, session::RESULTS_KEY)
}

//! `billion generate`: one prompt in, streamed text out (or one JSON object with `--json`).

use super::{LoadArgs, SamplingArgs};
use crate::generation::{generate, GenerateParams};
use crate::load::device::{device_name, dtype_name};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: LoadArgs,
    /// Prompt text (BOS is added when the model's tokenizer adds one)
    #[arg(long, short = 'p', conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<String>>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when this text appears (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep only the last tokens of a prompt longer than the context window instead of refusing it
    #[arg(long)]
    pub truncate_prompt: bool,
    /// Do not add BOS to a text prompt
    #[arg(long)]
    pub no_bos: bool,
    /// Print one JSON object instead of streaming text
    #[arg(long)]
    pub json: bool,
    /// Feed the prompt N tokens per forward pass instead of all at once (1: every prompt token goes through
    /// the decode step)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_chunk: Option<u64>,
    /// Write the logits at every prompt position to this safetensors file (tensor `logits`, f32 [len, vocab])
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

fn parse_ids(ids: &[String]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|s| s.trim().parse::<u32>().with_context(|| format!("--prompt-ids: `{s}` is not a token id")))
        .collect()
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = a.sampling.params()?;
    if a.prompt.is_none() && a.prompt_ids.is_none() {
        bail!("give --prompt TEXT or --prompt-ids 1,2,3");
    }
    let ids = a.prompt_ids.as_deref().map(parse_ids).transpose()?;
    if let Some(path) = &a.logits_out {
        crate::util::check_output_file(path).context("--logits-out")?;
    }
    let loaded = a.model.load()?;
    if let Some(note) = loaded.kept_dense_note() {
        eprintln!("note: {note}");
    }
    let cfg = loaded.config().clone();
    let mut prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => loaded
            .tokenizer()
            .context("--prompt (text needs a tokenizer; --prompt-ids takes ids)")?
            .encode(text, !a.no_bos)?,
        (None, Some(_)) => {
            let ids = ids.expect("parsed above");
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                bail!(
                    "--prompt-ids: token id {bad} is out of range for a vocabulary of {} (valid: 0..{})",
                    cfg.vocab_size,
                    cfg.vocab_size - 1
                );
            }
            ids
        }
        _ => unreachable!(),
    };
    if prompt.is_empty() {
        bail!("--prompt: the prompt encodes to no tokens");
    }
    let ctx = cfg.max_position_embeddings;
    // With --truncate-prompt the prompt keeps its last tokens and leaves room for the answer (at least one
    // prompt token stays).
    let keep = ctx - a.max_tokens.min(ctx - 1);
    if a.truncate_prompt && prompt.len() > keep {
        eprintln!(
            "note: prompt of {} tokens truncated to its last {keep}, leaving room for {} new tokens in the context window of {ctx}",
            prompt.len(),
            ctx - keep
        );
        prompt.drain(..prompt.len() - keep);
    } else if prompt.len() > ctx {
        bail!(
            "prompt has {} tokens but the model's context window is {ctx}; shorten it or pass --truncate-prompt to keep the last {keep}",
            prompt.len()
        );
    }
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling,
        eos_ids: loaded.eos_ids(),
        stop_strings: a.stop.clone(),
        keep_prompt_logits: a.logits_out.is_some(),
        prefill_chunk: a.prefill_chunk.map(|n| n as usize),
        interrupt: None,
    };
    let mut cache = loaded.model.new_cache().with_capacity(prompt.len() + a.max_tokens);
    let stdout = std::io::stdout();
    let json = a.json;
    let gen = generate(&loaded.model, loaded.tokenizer.as_ref(), &prompt, &mut cache, &params, |t| {
        if !json {
            let mut out = stdout.lock();
            if out.write_all(t.as_bytes()).and_then(|_| out.flush()).is_err() {
                // stdout was closed (`| head`): nobody reads the rest.
                std::process::exit(crate::util::CLOSED_STDOUT_EXIT);
            }
        }
    })?;
    if let (Some(path), Some(logits)) = (&a.logits_out, &gen.prompt_logits) {
        write_logits(path, logits)?;
    }
    if json {
        let v = serde_json::json!({
            "model": loaded.source.display().to_string(),
            "architecture": cfg.architecture.name(),
            "device": device_name(loaded.model.device()),
            "dtype": dtype_name(loaded.model.dtype()),
            "quantization": loaded.quantization,
            "prompt_tokens": prompt,
            "tokens": gen.tokens,
            "text": gen.text,
            "stop_reason": gen.stop_reason,
            "timings": {
                "load_s": loaded.load_seconds,
                "prefill_tok_s": gen.prefill_tok_s(prompt.len()),
                "decode_tok_s": gen.decode_tok_s(),
                "ttft_ms": gen.ttft_seconds * 1000.0,
            }
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s, ttft {:.1} ms, load {:.2} s]",
            prompt.len(),
            gen.tokens.len(),
            gen.prefill_tok_s(prompt.len()),
            gen.decode_tok_s(),
            gen.ttft_seconds * 1000.0,
            loaded.load_seconds
        );
    }
    Ok(())
}

fn write_logits(path: &std::path::Path, logits: &candle_core::Tensor) -> Result<()> {
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    crate::util::save_safetensors_atomic(path, &std::collections::HashMap::from([("logits".to_string(), logits)]))
        .context("--logits-out")
}

//! Autoregressive generation: prefill the prompt, then decode token by token through the KV cache,
//! streaming text as it becomes complete and stopping at EOS ids, stop strings, the token limit or the
//! end of the context window.

pub mod batch;
pub mod sampling;

use crate::model::{KvCache, Model};
use crate::tokenizer::{TokenStream, Tokenizer};
use anyhow::{bail, Result};
use candle_core::Tensor;
use sampling::{Sampler, SamplingParams};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Keep the logits of every prompt position (for `--logits-out`).
    pub keep_prompt_logits: bool,
    /// Feed the prompt this many tokens per forward pass (bounds prefill memory; 1 runs every prompt token
    /// through the decode step). `None`: the whole prompt at once.
    pub prefill_chunk: Option<usize>,
    /// Checked before every decode step: set it (Ctrl-C) to end the reply early.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Record, for every generated token, its log-probability and the `top_logprobs` likeliest tokens of
    /// the model's distribution at that step (0: none; the logits then stay on the device when greedy).
    pub top_logprobs: usize,
}

impl GenerateParams {
    pub fn new(max_tokens: usize, sampling: SamplingParams, eos_ids: Vec<u32>) -> Self {
        Self {
            max_tokens,
            sampling,
            eos_ids,
            stop_strings: vec![],
            keep_prompt_logits: false,
            prefill_chunk: None,
            interrupt: None,
            top_logprobs: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    Interrupted,
}

#[derive(Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub ttft_seconds: f64,
    pub prompt_logits: Option<Tensor>,
    /// One entry per generated token when `GenerateParams::top_logprobs` > 0.
    pub logprobs: Vec<TokenLogprobs>,
}

/// A generated token's log-probability under the model (before temperature and penalties) and the
/// likeliest tokens at its step, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The step's log-softmax over `logits`, then the `n` likeliest tokens (ties: the lower id first).
    pub fn at_step(logits: &[f32], chosen: u32, n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let norm = max as f64 + sum.ln();
        let logprob = |id: u32| (logits[id as usize] as f64 - norm) as f32;
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(ids.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if n > 0 && n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_logit);
        }
        ids.truncate(n);
        ids.sort_unstable_by(by_logit);
        Self { id: chosen, logprob: logprob(chosen), top: ids.into_iter().map(|id| (id, logprob(id))).collect() }
    }
}

impl Generation {
    pub fn prefill_tok_s(&self, prompt_len: usize) -> f64 {
        prompt_len as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Tokens per second over the decode steps (every token after the first, which prefill produced).
    pub fn decode_tok_s(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if steps == 0 {
            0.0
        } else {
            steps as f64 / self.decode_seconds.max(1e-9)
        }
    }
}

/// Logits `[vocab]` (f32) → next token, with a device-side argmax when greedy and unpenalised and no
/// log-probabilities are asked for (`top_logprobs` > 0 appends the step's to `logprobs`).
fn next_token(
    logits: &Tensor,
    sampler: &mut Sampler,
    history: &[u32],
    top_logprobs: usize,
    logprobs: &mut Vec<TokenLogprobs>,
) -> Result<u32> {
    let p = sampler.params();
    if p.is_greedy() && p.repeat_penalty == 1.0 && top_logprobs == 0 {
        return Ok(crate::ops::fused::argmax_last(logits)?.to_scalar::<u32>()?);
    }
    let mut l = logits.to_vec1::<f32>()?;
    // The model's own distribution, before penalties change `l` (copied only when asked for).
    let raw = (top_logprobs > 0).then(|| l.clone());
    sampler.penalize(&mut l, history);
    let token = sampler.sample(&l);
    if let Some(raw) = raw {
        logprobs.push(TokenLogprobs::at_step(&raw, token, top_logprobs));
    }
    Ok(token)
}

/// Length of the longest suffix of `text` that begins some stop string (held back from streaming).
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for n in (1..s.len()).rev() {
            if n <= text.len() && text.is_char_boundary(text.len() - n) && s.starts_with(&text[text.len() - n..]) {
                hold = hold.max(n);
                break;
            }
        }
    }
    hold
}

/// Generate after `prompt`, continuing `cache` (which must already hold anything before `prompt`).
/// `on_text` receives text as it becomes final.
pub fn generate(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    cache: &mut KvCache,
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}");
    }
    if cache.len() + prompt.len() > cache.max_len() {
        bail!(
            "the prompt has {} tokens but the context window is {} tokens{}",
            prompt.len(),
            cache.max_len(),
            if cache.is_empty() { String::new() } else { format!(" ({} already used)", cache.len()) }
        );
    }
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let start = Instant::now();
    let chunk = params.prefill_chunk.unwrap_or(prompt.len()).max(1);
    let mut kept = vec![];
    let mut last = None;
    for piece in prompt.chunks(chunk) {
        let input = model.input(piece)?;
        if params.keep_prompt_logits {
            let all = model.forward(&input, cache)?.squeeze(0)?;
            last = Some(all.get(piece.len() - 1)?);
            kept.push(all);
        } else {
            last = Some(model.forward_last(&input, cache)?.squeeze(0)?);
        }
    }
    let last = last.expect("the prompt is not empty");
    let prompt_logits = if params.keep_prompt_logits { Some(Tensor::cat(&kept, 0)?) } else { None };
    if params.max_tokens == 0 {
        let prefill_seconds = start.elapsed().as_secs_f64();
        return Ok(Generation {
            tokens: vec![],
            text: String::new(),
            stop_reason: StopReason::MaxTokens,
            prefill_seconds,
            decode_seconds: 0.0,
            ttft_seconds: prefill_seconds,
            prompt_logits,
            logprobs: vec![],
        });
    }
    let mut logprobs = vec![];
    let mut token = next_token(&last, &mut sampler, &history, params.top_logprobs, &mut logprobs)?;
    let ttft = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();

    let mut stream = tokenizer.map(TokenStream::new);
    let mut tokens = vec![];
    let mut text = String::new();
    let mut printed = 0;
    let stop_reason;
    loop {
        if params.eos_ids.contains(&token) {
            stop_reason = StopReason::Eos;
            break;
        }
        tokens.push(token);
        history.push(token);
        if let Some(s) = stream.as_mut() {
            if let Some(piece) = s.push(token)? {
                text.push_str(&piece);
            }
        }
        if let Some(pos) = params
            .stop_strings
            .iter()
            .filter_map(|s| text[printed.min(text.len())..].find(s.as_str()).map(|p| p + printed))
            .min()
        {
            text.truncate(pos);
            if pos > printed {
                on_text(&text[printed..]);
            }
            printed = text.len();
            stop_reason = StopReason::StopString;
            break;
        }
        let safe = text.len() - held_back(&text, &params.stop_strings);
        if safe > printed {
            on_text(&text[printed..safe]);
            printed = safe;
        }
        if tokens.len() >= params.max_tokens {
            stop_reason = StopReason::MaxTokens;
            break;
        }
        if cache.len() >= cache.max_len() {
            stop_reason = StopReason::ContextFull;
            break;
        }
        if params.interrupt.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed)) {
            stop_reason = StopReason::Interrupted;
            break;
        }
        let logits = model.forward_last(&model.input(&[token])?, cache)?.squeeze(0)?;
        token = next_token(&logits, &mut sampler, &history, params.top_logprobs, &mut logprobs)?;
    }
    if stop_reason != StopReason::StopString {
        if let Some(s) = stream.as_mut() {
            if let Some(rest) = s.finish()? {
                text.push_str(&rest);
            }
        }
        if text.len() > printed {
            on_text(&text[printed..]);
        }
    }
    let decode_seconds = decode_start.elapsed().as_secs_f64();
    // The EOS that ended the reply is not a generated token.
    logprobs.truncate(tokens.len());
    Ok(Generation {
        tokens,
        text,
        stop_reason,
        prefill_seconds: ttft,
        decode_seconds,
        ttft_seconds: ttft,
        prompt_logits,
        logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::TokenLogprobs;

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_is_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let s = TokenLogprobs::at_step(&logits, 2, 3);
        let norm = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((s.logprob as f64 - (2.0 - norm)).abs() < 1e-6);
        // Ties keep the lower id first.
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((s.top[0].1 as f64 - (3.0 - norm)).abs() < 1e-6);
        assert_eq!(TokenLogprobs::at_step(&logits, 0, 20).top.len(), 5);
    }
}

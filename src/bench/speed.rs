//! Prefill and decode speed, as llama-bench measures them (`-p 512 -n 128 -r 5`).

use crate::model::Model;
use anyhow::Result;
use std::time::Instant;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Throughput {
    pub tokens: usize,
    #[serde(deserialize_with = "super::records::f64_or_nan")]
    pub mean_tok_s: f64,
    #[serde(deserialize_with = "super::records::f64_or_nan")]
    pub sd_tok_s: f64,
    pub runs: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedResult {
    pub prefill: Option<Throughput>,
    pub decode: Option<Throughput>,
}

fn summarize(tokens: usize, runs: Vec<f64>) -> Throughput {
    let n = runs.len() as f64;
    let mean = runs.iter().sum::<f64>() / n;
    let var = if runs.len() > 1 { runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Throughput { tokens, mean_tok_s: mean, sd_tok_s: var.sqrt(), runs }
}

/// Deterministic pseudo-random prompt ids (ids below 3 are usually specials; avoid them).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// Wait for queued device work so timings cover it.
fn sync(model: &Model) -> Result<()> {
    model.device().synchronize()?;
    Ok(())
}

/// One prefill of `n` tokens; seconds.
pub fn time_prefill(model: &Model, n: usize) -> Result<f64> {
    let ids = prompt_ids(n, model.config().vocab_size);
    let mut cache = model.new_cache().with_capacity(n);
    let input = model.input(&ids)?;
    sync(model)?;
    let start = Instant::now();
    let logits = model.forward_last(&input, &mut cache)?;
    let _ = crate::ops::fused::argmax_last(&logits)?.to_vec1::<u32>()?;
    Ok(start.elapsed().as_secs_f64())
}

/// `n` decode steps from an empty cache, each feeding back the greedy token; seconds.
pub fn time_decode(model: &Model, n: usize) -> Result<f64> {
    let mut cache = model.new_cache().with_capacity(n + 1);
    let mut token = model.config().bos_token_id.unwrap_or(1).min(model.config().vocab_size as u32 - 1);
    sync(model)?;
    let start = Instant::now();
    for _ in 0..n {
        let logits = model.forward_last(&model.input(&[token])?, &mut cache)?;
        token = crate::ops::fused::argmax_last(&logits)?.squeeze(0)?.to_scalar::<u32>()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Measure prefill of `prompt` tokens and decode of `gen` tokens, `reps` times each after one warm-up.
pub fn measure(model: &Model, prompt: usize, gen: usize, reps: usize) -> Result<SpeedResult> {
    Ok(measure_until(model, prompt, gen, reps, &std::sync::atomic::AtomicBool::new(false))?.expect("never stopped"))
}

/// [`measure`], checking `stop` before every repetition: `None` when it was set before the end (a partial
/// measurement is not a result).
pub fn measure_until(
    model: &Model,
    prompt: usize,
    gen: usize,
    reps: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<SpeedResult>> {
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let reps = reps.max(1);
    let timed = |n: usize, time: &dyn Fn(&Model, usize) -> Result<f64>, warm: usize| -> Result<Option<Throughput>> {
        if n == 0 {
            return Ok(None);
        }
        time(model, warm)?;
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps {
            if stopped() {
                return Ok(None);
            }
            runs.push(n as f64 / time(model, n)?);
        }
        Ok(Some(summarize(n, runs)))
    };
    let prefill = timed(prompt, &time_prefill, prompt)?;
    let decode = timed(gen, &time_decode, gen.min(16))?;
    if stopped() {
        return Ok(None);
    }
    Ok(Some(SpeedResult { prefill, decode }))
}

/// Time of one target forward over `n` new tokens after `context` cached tokens (seconds, median of `reps`).
/// Speculative decoding verifies k+1 tokens this way; `n = 1` is an ordinary decode step.
pub fn time_verify(model: &Model, context: usize, n: usize, reps: usize) -> Result<f64> {
    let ids = prompt_ids(context + n, model.config().vocab_size);
    let mut cache = model.new_cache().with_capacity(context + n);
    model.forward_last(&model.input(&ids[..context])?, &mut cache)?;
    let input = model.input(&ids[context..])?;
    let mut times = vec![];
    // Two warm-ups: a small pass runs uncaptured the first time its shape is seen, and is captured the second.
    for _ in 0..reps.max(1) + 2 {
        cache.truncate(context);
        sync(model)?;
        let start = Instant::now();
        let logits = model.forward(&input, &mut cache)?;
        let _ = crate::ops::fused::argmax_last(&logits)?.to_vec2::<u32>()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.drain(..2);
    times.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Ok(times[times.len() / 2])
}

//! Many prompts through one batch: rows of different lengths decode together, each with its own limit,
//! stop strings and sampler, and a finished row is refilled from the queue so the batch stays full.

use super::sampling::{Sampler, SamplingParams};
use super::{generate, held_back, GenerateParams, StopReason};
use crate::model::{KvCache, Model};
use crate::ops::fused::{sample_rows, RowDraw};
use crate::tokenizer::{TokenStream, Tokenizer};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One prompt of a batch run.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    pub sampling: SamplingParams,
}

/// What one request produced.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
}

#[derive(Debug, Clone)]
pub struct BatchParams {
    /// Rows decoded together (at least 1).
    pub batch: usize,
    pub eos_ids: Vec<u32>,
    /// Set it (Ctrl-C) to stop: rows in flight end `Interrupted`, requests not started are not reported.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// Totals of a batch run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BatchStats {
    pub requests_done: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

impl BatchStats {
    /// Another run's totals added to these, the two having run at once (the time is the longer one's).
    pub fn merge(&mut self, other: &BatchStats) {
        self.requests_done += other.requests_done;
        self.prompt_tokens += other.prompt_tokens;
        self.generated_tokens += other.generated_tokens;
        self.seconds = self.seconds.max(other.seconds);
    }

    /// Generated tokens per second of wall time (prefill included).
    pub fn tok_s(&self) -> f64 {
        self.generated_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Generate for every request, `params.batch` rows at a time. `on_done(index, output)` is called as each
/// request finishes (completion order, not input order). Every prompt must be non-empty and fit the context
/// window (check before calling: an unfit request is an error here, before any work).
///
/// Greedy rows produce what [`generate`] produces for the prompt alone; sampled rows draw from their own
/// seeded sampler, as alone. With a batch of 1 every request goes through [`generate`] itself.
pub fn generate_batch(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    requests: &[BatchRequest],
    params: &BatchParams,
    mut on_done: impl FnMut(usize, BatchOutput) -> Result<()>,
) -> Result<BatchStats> {
    if params.batch == 0 {
        bail!("the batch size must be at least 1");
    }
    let (vocab, window) = (model.config().vocab_size, model.config().max_position_embeddings);
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            bail!("request {}: the prompt is empty", i + 1);
        }
        if r.prompt.len() > window {
            bail!("request {}: the prompt has {} tokens but the context window is {window}", i + 1, r.prompt.len());
        }
        if let Some(bad) = r.prompt.iter().find(|&&id| id as usize >= vocab) {
            bail!("request {}: token id {bad} is outside the model's vocabulary of {vocab}", i + 1);
        }
    }
    let start = Instant::now();
    let mut stats = BatchStats::default();
    let mut finish = |index: usize, out: BatchOutput, stats: &mut BatchStats| {
        stats.requests_done += 1;
        stats.prompt_tokens += requests[index].prompt.len();
        stats.generated_tokens += out.tokens.len();
        on_done(index, out)
    };
    if params.batch == 1 {
        for (i, r) in requests.iter().enumerate() {
            if interrupted(params) {
                break;
            }
            let mut gp = GenerateParams::new(r.max_tokens, r.sampling.clone(), params.eos_ids.clone());
            gp.stop_strings = r.stop_strings.clone();
            gp.interrupt = params.interrupt.clone();
            let mut cache = model.new_cache().with_capacity(r.prompt.len() + r.max_tokens);
            let g = generate(model, tokenizer, &r.prompt, &mut cache, &gp, |_| {})?;
            finish(i, BatchOutput { tokens: g.tokens, text: g.text, stop_reason: g.stop_reason }, &mut stats)?;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        return Ok(stats);
    }

    let mut engine = Engine {
        model,
        tokenizer,
        requests,
        eos_ids: &params.eos_ids,
        window,
        cache: model.new_cache(),
        rows: vec![],
        next: 0,
        width: params.batch.min(requests.len()),
    };
    loop {
        for (index, out) in engine.fill()? {
            finish(index, out, &mut stats)?;
        }
        if engine.rows.iter().all(Option::is_none) {
            break;
        }
        if interrupted(params) {
            for row in engine.rows.iter_mut().filter_map(Option::take) {
                let (index, out) = row.end(StopReason::Interrupted)?;
                finish(index, out, &mut stats)?;
            }
            break;
        }
        for (index, out) in engine.step()? {
            finish(index, out, &mut stats)?;
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// A refill waits for this share of the batch's slots to be free (1/8: the batch stays ≥ 7/8 full).
const REFILL_SHARE: usize = 8;

fn interrupted(params: &BatchParams) -> bool {
    params.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// One request in flight.
struct Row<'t> {
    index: usize,
    prompt_len: usize,
    max_tokens: usize,
    stops: &'t [String],
    tokens: Vec<u32>,
    /// Prompt and generated tokens (the repeat penalty's window).
    history: Vec<u32>,
    stream: Option<TokenStream<'t>>,
    text: String,
    /// Text before this offset holds no stop string (the rest may still begin one).
    scanned: usize,
    sampler: Sampler,
}

impl<'t> Row<'t> {
    /// Take the next token; `Some(reason)` when the row is finished (as the single-prompt loop decides).
    fn push(&mut self, token: u32, eos_ids: &[u32], window: usize) -> Result<Option<StopReason>> {
        if eos_ids.contains(&token) {
            return Ok(Some(StopReason::Eos));
        }
        self.tokens.push(token);
        self.history.push(token);
        if let Some(s) = self.stream.as_mut() {
            if let Some(piece) = s.push(token)? {
                self.text.push_str(&piece);
            }
        }
        let from = self.scanned.min(self.text.len());
        if let Some(pos) = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| p + from)).min()
        {
            self.text.truncate(pos);
            return Ok(Some(StopReason::StopString));
        }
        self.scanned = self.text.len() - held_back(&self.text, self.stops);
        if self.tokens.len() >= self.max_tokens {
            return Ok(Some(StopReason::MaxTokens));
        }
        // The cache holds the prompt and every token but this last one: it is full when that reaches the window.
        if self.prompt_len + self.tokens.len() > window {
            return Ok(Some(StopReason::ContextFull));
        }
        Ok(None)
    }

    fn end(mut self, reason: StopReason) -> Result<(usize, BatchOutput)> {
        if reason != StopReason::StopString {
            if let Some(rest) = self.stream.as_mut().map(|s| s.finish()).transpose()?.flatten() {
                self.text.push_str(&rest);
            }
        }
        Ok((self.index, BatchOutput { tokens: self.tokens, text: self.text, stop_reason: reason }))
    }

    /// This row's next draw as the device sampler takes it (the draw index: tokens generated so far).
    fn device_draw(&self) -> RowDraw {
        let p = self.sampler.params();
        RowDraw {
            temperature: if p.is_greedy() { 0.0 } else { p.temperature as f32 },
            top_p: p.top_p.map_or(1.0, |v| v as f32),
            top_k: p.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            seed: p.seed,
            draw: self.tokens.len() as u32,
        }
    }

    fn wants_host_logits(&self) -> bool {
        let p = self.sampler.params();
        !p.is_greedy() || p.repeat_penalty != 1.0
    }
}

/// The batch: one KV cache row per slot, a queue of requests behind it.
struct Engine<'a> {
    model: &'a Model,
    tokenizer: Option<&'a Tokenizer>,
    requests: &'a [BatchRequest],
    eos_ids: &'a [u32],
    window: usize,
    cache: KvCache,
    /// One entry per cache row; `None`: the slot waits for a request (or the queue is empty).
    rows: Vec<Option<Row<'a>>>,
    /// The next request of the queue.
    next: usize,
    width: usize,
}

impl<'a> Engine<'a> {
    fn new_row(&self, index: usize) -> Row<'a> {
        let r = &self.requests[index];
        Row {
            index,
            prompt_len: r.prompt.len(),
            max_tokens: r.max_tokens,
            stops: &r.stop_strings,
            tokens: vec![],
            history: r.prompt.clone(),
            stream: self.tokenizer.map(TokenStream::new),
            text: String::new(),
            scanned: 0,
            sampler: Sampler::new(r.sampling.clone()),
        }
    }

    /// Start queued requests in free slots (prefilled together, then moved into their rows) and take their
    /// first tokens. Returns the requests that finished on the way (also those asking for no tokens).
    fn fill(&mut self) -> Result<Vec<(usize, BatchOutput)>> {
        let mut done = vec![];
        loop {
            let first = self.rows.is_empty();
            let free: Vec<usize> = if first {
                (0..self.width).collect()
            } else {
                (0..self.rows.len()).filter(|&s| self.rows[s].is_none()).collect()
            };
            // Refills wait until enough slots are free to share one prefill (or the queue's rest fits): a
            // prefill and its row moves cost many launches, one per finished row would stall every step.
            let waiting = self.requests.len() - self.next;
            let live = self.rows.iter().any(Option::is_some);
            if !first && live && free.len() < waiting.min((self.width / REFILL_SHARE).max(1)) {
                return Ok(done);
            }
            let mut starting = vec![];
            while starting.len() < free.len() && self.next < self.requests.len() {
                let index = self.next;
                self.next += 1;
                if self.requests[index].max_tokens == 0 {
                    done.push(self.new_row(index).end(StopReason::MaxTokens)?);
                } else {
                    starting.push(index);
                }
            }
            if starting.is_empty() {
                return Ok(done);
            }
            // Requests with the same prompt (pass@k samples of one problem) share one prefill: each unique
            // prompt is run once and copied into every row that starts with it.
            let mut unique: Vec<&[u32]> = vec![];
            let mut seen: std::collections::HashMap<&[u32], usize> = Default::default();
            let of_unique: Vec<usize> = starting
                .iter()
                .map(|&i| {
                    let p = self.requests[i].prompt.as_slice();
                    *seen.entry(p).or_insert_with(|| {
                        unique.push(p);
                        unique.len() - 1
                    })
                })
                .collect();
            let longest = unique.iter().map(|p| p.len()).max().unwrap_or(0);
            let logits = if first {
                // The first requests go straight into the batch's cache, allocated once for the longest
                // prompt and answer of the whole queue (refills reuse the columns; compaction frees them).
                let most = self.requests.iter().map(|r| r.prompt.len() + r.max_tokens).max().unwrap_or(0);
                self.cache = self.model.new_cache().with_capacity(most.max(longest));
                self.rows = (0..starting.len()).map(|_| None).collect();
                let logits = self.model.prefill_rows(&unique, &mut self.cache)?;
                if unique.len() < starting.len() {
                    self.cache.retain_rows(&of_unique)?;
                }
                logits
            } else {
                let mut fresh = self.model.new_cache().with_capacity(longest);
                let logits = self.model.prefill_rows(&unique, &mut fresh)?;
                for (&u, &slot) in of_unique.iter().zip(&free) {
                    self.cache.place_row(slot, &fresh, u)?;
                }
                logits
            };
            let logits = if unique.len() < starting.len() {
                let index: Vec<u32> = of_unique.iter().map(|&u| u as u32).collect();
                logits.index_select(&Tensor::from_vec(index, starting.len(), logits.device())?, 0)?
            } else {
                logits
            };
            let slots: Vec<usize> = if first { (0..starting.len()).collect() } else { free };
            let mut new_rows: Vec<Row<'a>> = starting.iter().map(|&i| self.new_row(i)).collect();
            let tokens = choose(&logits, &mut new_rows)?;
            for ((row, token), &slot) in new_rows.into_iter().zip(tokens).zip(&slots) {
                self.admit(slot, row, token, &mut done)?;
            }
        }
    }

    /// Give `row` its next token; a finished row leaves its slot.
    fn admit(&mut self, slot: usize, mut row: Row<'a>, token: u32, done: &mut Vec<(usize, BatchOutput)>) -> Result<()> {
        match row.push(token, self.eos_ids, self.window)? {
            Some(reason) => {
                done.push(row.end(reason)?);
                self.rows[slot] = None;
            }
            None => self.rows[slot] = Some(row),
        }
        Ok(())
    }

    /// One decode step of every row in flight.
    fn step(&mut self) -> Result<Vec<(usize, BatchOutput)>> {
        // Once nothing waits, a mostly empty batch shrinks to its live rows.
        let live: Vec<usize> = (0..self.rows.len()).filter(|&s| self.rows[s].is_some()).collect();
        if self.next >= self.requests.len() && live.len() * 2 <= self.rows.len() {
            self.cache.retain_rows(&live)?;
            let mut kept: Vec<Option<Row<'a>>> = vec![];
            for s in live {
                kept.push(self.rows[s].take());
            }
            self.rows = kept;
        }
        for s in 0..self.rows.len() {
            if self.rows[s].is_none() {
                self.cache.clear_row(s);
            }
        }
        // Columns no row uses any more are dropped when the window is reached, or once they are half.
        let unused = self.cache.starts().iter().copied().min().unwrap_or(0);
        if self.cache.prefix_len() + self.cache.len() + 1 > self.window
            || (unused >= 256 && unused * 2 >= self.cache.len())
        {
            self.cache.compact()?;
        }
        let ids: Vec<u32> =
            self.rows.iter().map(|r| r.as_ref().map_or(0, |r| *r.history.last().expect("a prompt"))).collect();
        let input = Tensor::from_vec(ids, (self.rows.len(), 1), self.model.device())?;
        let logits = self.model.forward_last(&input, &mut self.cache)?;
        let slots: Vec<usize> = (0..self.rows.len()).filter(|&s| self.rows[s].is_some()).collect();
        let mut rows: Vec<Row<'a>> = slots.iter().map(|&s| self.rows[s].take().expect("live")).collect();
        let live_logits = if slots.len() == logits.dim(0)? {
            logits
        } else {
            let index = slots.iter().map(|&s| s as u32).collect::<Vec<_>>();
            logits.index_select(&Tensor::from_vec(index, slots.len(), logits.device())?, 0)?
        };
        let tokens = choose(&live_logits, &mut rows)?;
        // Each row's text (detokenizing, stop strings) is its own: rows spread over the cores.
        let reasons = push_all(&mut rows, &tokens, self.eos_ids, self.window);
        let mut done = vec![];
        for ((row, reason), slot) in rows.into_iter().zip(reasons).zip(slots) {
            match reason? {
                Some(reason) => done.push(row.end(reason)?),
                None => self.rows[slot] = Some(row),
            }
        }
        Ok(done)
    }
}

/// [`Row::push`] of every row's token, on the cores (a large batch's text work is a visible share of a step).
fn push_all(rows: &mut [Row], tokens: &[u32], eos_ids: &[u32], window: usize) -> Vec<Result<Option<StopReason>>> {
    let mut reasons: Vec<Result<Option<StopReason>>> = (0..rows.len()).map(|_| Ok(None)).collect();
    // A few rows are not worth a thread.
    let per = if rows.len() < 32 { rows.len().max(1) } else { crate::util::items_per_thread(rows.len()) };
    std::thread::scope(|scope| {
        for ((rows, tokens), out) in rows.chunks_mut(per).zip(tokens.chunks(per)).zip(reasons.chunks_mut(per)) {
            scope.spawn(move || {
                for ((row, &token), r) in rows.iter_mut().zip(tokens).zip(out) {
                    *r = row.push(token, eos_ids, window);
                }
            });
        }
    });
    reasons
}

/// Each row's next token from its logits row (`logits` `[rows, vocab]`, f32): one device argmax for the
/// greedy rows, the rows' own samplers on the host for the others.
fn choose(logits: &Tensor, rows: &mut [Row]) -> Result<Vec<u32>> {
    if !rows.iter().any(|r| r.wants_host_logits()) {
        return Ok(crate::ops::fused::argmax_last(logits)?.to_vec1::<u32>()?);
    }
    // On the GPU, rows without a repeat penalty draw there: `[rows, vocab]` logits never cross to the host.
    if logits.device().is_cuda() && rows.iter().all(|r| r.sampler.params().repeat_penalty == 1.0) {
        let draws: Vec<RowDraw> = rows.iter().map(Row::device_draw).collect();
        return Ok(sample_rows(logits, &draws)?.to_vec1::<u32>()?);
    }
    let all = logits.to_vec2::<f32>()?;
    // Each row's penalty, softmax and draw are its own (its sampler, its history): rows spread over the cores.
    let mut tokens = vec![0u32; rows.len()];
    let per = crate::util::items_per_thread(rows.len());
    std::thread::scope(|scope| {
        for ((rows, logits), out) in rows.chunks_mut(per).zip(all.chunks(per)).zip(tokens.chunks_mut(per)) {
            scope.spawn(move || {
                for ((row, l), t) in rows.iter_mut().zip(logits).zip(out) {
                    let mut l = l.clone();
                    row.sampler.penalize(&mut l, &row.history);
                    *t = row.sampler.sample(&l);
                }
            });
        }
    });
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::REGISTRY;
    use crate::model::config::ModelConfig;
    use crate::model::weights::Weights;
    use candle_core::{DType, Device};

    fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> BatchRequest {
        BatchRequest { prompt, max_tokens, stop_strings: vec![], sampling }
    }

    fn alone(model: &Model, tok: Option<&Tokenizer>, r: &BatchRequest, eos: &[u32]) -> Result<BatchOutput> {
        let params = BatchParams { batch: 1, eos_ids: eos.to_vec(), interrupt: None };
        let mut out = None;
        generate_batch(model, tok, std::slice::from_ref(r), &params, |_, o| {
            out = Some(o);
            Ok(())
        })?;
        Ok(out.expect("one output"))
    }

    fn batched(
        model: &Model,
        tok: Option<&Tokenizer>,
        reqs: &[BatchRequest],
        batch: usize,
        eos: &[u32],
    ) -> Result<Vec<BatchOutput>> {
        let params = BatchParams { batch, eos_ids: eos.to_vec(), interrupt: None };
        let mut outs: Vec<Option<BatchOutput>> = vec![None; reqs.len()];
        let stats = generate_batch(model, tok, reqs, &params, |i, o| {
            assert!(outs[i].is_none(), "request {i} reported twice");
            outs[i] = Some(o);
            Ok(())
        })?;
        assert_eq!(stats.requests_done, reqs.len());
        Ok(outs.into_iter().map(|o| o.expect("every request reported")).collect())
    }

    /// More prompts than rows, of different lengths and limits, greedy and sampled, one ending at an EOS id:
    /// each row's tokens equal that prompt generated alone, for every architecture, on f32 and on 8- and
    /// 4-bit weights (whose 8-bit activation rounding turns any last-bit difference into another token).
    #[test]
    fn every_row_equals_its_prompt_alone() -> Result<()> {
        use crate::model::quant::Quantize;
        // Held throughout: a test beside this one taking or dropping it would switch a long prompt's prefill
        // between the 8-bit kernels and the f32 tiles between the batched run and the run alone.
        let _exact = crate::model::linear::ExactScoring::hold();
        for (spec, q) in
            REGISTRY.iter().flat_map(|s| [None, Some(Quantize::Q8_0), Some(Quantize::Q4_0)].map(|q| (s, q)))
        {
            let mut json = (spec.tiny_config)(320);
            // Quantized weights need our CPU pass, which has no per-head q/k norms (StableLM-2-1.6B has
            // none; a model with them keeps the tensor-op batch, exact in f32 only).
            if q.is_some() && json.get("qk_layernorm").is_some() {
                json["qk_layernorm"] = false.into();
            }
            let cfg = ModelConfig::from_hf_json(&json)?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &Device::Cpu).with_quantize(q))?;
            let sampled = SamplingParams { temperature: 0.9, top_p: Some(0.95), seed: 7, ..Default::default() };
            let greedy = SamplingParams::default();
            let mut reqs: Vec<BatchRequest> = (0..9)
                .map(|i| {
                    let prompt: Vec<u32> =
                        (0..(3 + 7 * i) % 23 + 1).map(|j| ((i * 37 + j * 11) % 300) as u32 + 3).collect();
                    let sampling = if i % 3 == 2 { sampled.clone() } else { greedy.clone() };
                    request(prompt, [12, 5, 30, 1, 0, 17][i % 6], sampling)
                })
                .collect();
            // A long prompt that reaches the context window while decoding (256 positions).
            reqs.push(request((0..250).map(|j| (j % 300) as u32 + 3).collect(), 40, greedy.clone()));
            // The EOS id is the first greedy token of one prompt alone: that row ends at once.
            let first = alone(&m, None, &reqs[0], &[])?.tokens[3];
            let eos = [first];
            let outs = batched(&m, None, &reqs, 4, &eos)?;
            for (i, (r, got)) in reqs.iter().zip(&outs).enumerate() {
                let want = alone(&m, None, r, &eos)?;
                assert_eq!(got.tokens, want.tokens, "{} {q:?}: request {i}", spec.name);
                assert_eq!(got.stop_reason, want.stop_reason, "{} {q:?}: request {i}", spec.name);
            }
            // Without an EOS id the long row runs into the window (with one, the random model may say it first).
            let outs = batched(&m, None, &reqs[6..], 3, &[])?;
            assert_eq!(outs[3].stop_reason, StopReason::ContextFull, "{}", spec.name);
            assert_eq!(outs[3].tokens, alone(&m, None, &reqs[9], &[])?.tokens, "{}", spec.name);
        }
        Ok(())
    }

    /// A batch shrunk to one live row whose columns start past the first (it was padded beside a longer
    /// prompt) decodes that row exactly as it decodes alone — on f32 and 8-bit weights, for every architecture.
    /// (It once took the tensor ops there, whose other roundings parted a sampled row from its run alone about
    /// once in a thousand random models.)
    #[test]
    fn a_row_left_alone_in_its_batch_decodes_as_alone() -> Result<()> {
        use crate::model::quant::Quantize;
        let _exact = crate::model::linear::ExactScoring::hold();
        for (spec, q) in REGISTRY.iter().flat_map(|s| [None, Some(Quantize::Q8_0)].map(|q| (s, q))) {
            // Per-head q/k norms keep the tensor ops (our CPU pass has none; StableLM-2-1.6B has none).
            let mut json = (spec.tiny_config)(320);
            if json.get("qk_layernorm").is_some() {
                json["qk_layernorm"] = false.into();
            }
            let cfg = ModelConfig::from_hf_json(&json)?;
            let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &Device::Cpu).with_quantize(q))?;
            let short: Vec<u32> = (0..14).map(|j| (j * 11 % 300) as u32 + 3).collect();
            let long: Vec<u32> = (0..20).map(|j| (j * 7 % 300) as u32 + 3).collect();
            let mut batch = m.new_cache().with_capacity(40);
            m.prefill_rows(&[short.as_slice(), long.as_slice()], &mut batch)?;
            batch.retain_rows(&[0])?;
            let mut single = m.new_cache().with_capacity(40);
            m.prefill_rows(&[short.as_slice()], &mut single)?;
            for step in 0..6u32 {
                let ids = Tensor::from_vec(vec![5 + step * 37], (1, 1), &Device::Cpu)?;
                let got = m.forward_last(&ids, &mut batch)?.flatten_all()?.to_vec1::<f32>()?;
                let want = m.forward_last(&ids, &mut single)?.flatten_all()?.to_vec1::<f32>()?;
                assert!(got == want, "{} {q:?}: step {step}", spec.name);
            }
        }
        Ok(())
    }

    /// Requests with the same prompt (pass@k samples) share one prefill and still each equal their prompt alone,
    /// in the first fill and in refills.
    #[test]
    fn requests_sharing_a_prompt_equal_it_alone() -> Result<()> {
        let spec = REGISTRY[0];
        let cfg = ModelConfig::from_hf_json(&(spec.tiny_config)(320))?;
        let m = Model::build(&cfg, &Weights::random(cfg.architecture, DType::F32, &Device::Cpu))?;
        let (a, b): (Vec<u32>, Vec<u32>) = ((3..14).collect(), (40..45).collect());
        let reqs: Vec<BatchRequest> = [&a, &a, &b, &a, &b, &a, &a]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let sampling = match i % 3 {
                    0 => SamplingParams::default(),
                    _ => SamplingParams { temperature: 1.0, top_k: Some(20), seed: i as u64, ..Default::default() },
                };
                request(p.to_vec(), 6 + i, sampling)
            })
            .collect();
        for batch in [3, 7] {
            let outs = batched(&m, None, &reqs, batch, &[])?;
            for (i, (r, got)) in reqs.iter().zip(&outs).enumerate() {
                assert_eq!(got.tokens, alone(&m, None, r, &[])?.tokens, "batch {batch}: request {i}");
            }
        }
        Ok(())
    }

    /// Stop strings end their own row only, with the text cut before them, as alone.
    #[test]
    fn stop_strings_are_per_row() -> Result<()> {
        let dir = tempfile::tempdir()?;
        crate::testing::write_chat_model(dir.path(), 5)?;
        // On the CPU in f32: equality with the sequence alone is exact there (a GPU's bf16 GEMMs round by shape).
        let cpu = crate::load::LoadOptions { device: Some(crate::load::DeviceSpec::Cpu), ..Default::default() };
        let loaded = crate::load::load(dir.path().to_str().unwrap(), &cpu)?;
        let (m, tok) = (&loaded.model, loaded.tokenizer()?);
        let base: Vec<BatchRequest> = ["hello there", "a", "the quick brown fox"]
            .iter()
            .map(|p| Ok(request(tok.encode(p, true)?, 24, SamplingParams::default())))
            .collect::<Result<_>>()?;
        let plain = batched(m, Some(tok), &base, 3, &[])?;
        let mut reqs = base.clone();
        // Row 0 stops at a piece of its own text; row 2 at a string that never appears.
        let text = &plain[0].text;
        let cut = text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i);
        reqs[0].stop_strings = vec![text[cut..].chars().take(2).collect()];
        reqs[2].stop_strings = vec!["\u{1F980}never".into()];
        let outs = batched(m, Some(tok), &reqs, 2, &[])?;
        for (r, got) in reqs.iter().zip(&outs) {
            let want = alone(m, Some(tok), r, &[])?;
            assert_eq!((&got.text, got.stop_reason), (&want.text, want.stop_reason));
        }
        assert_eq!(outs[0].stop_reason, StopReason::StopString);
        assert!(outs[0].text.len() <= cut);
        assert_eq!(outs[2].stop_reason, StopReason::MaxTokens);
        Ok(())
    }
}

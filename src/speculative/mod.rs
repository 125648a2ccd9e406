//! Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k tokens, the
//! target scores all k+1 positions in one forward, and a rejection rule keeps the output distributed exactly
//! as the target's. Both KV caches roll back to the accepted prefix after every round.

pub mod session;

use crate::generation::sampling::{argmax, Sampler, SamplingParams};
use crate::model::{KvCache, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::time::Instant;

/// How drafted tokens are accepted. `AlwaysAccept` exists only to show that the distribution test catches a
/// wrong rule; it is not reachable from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum AcceptRule {
    Correct,
    AlwaysAccept,
}

#[derive(Debug, Clone)]
pub struct SpecParams {
    pub k: usize,
    /// Draft length follows acceptance: +2 after a fully accepted round, −1 after a rejection (as transformers'
    /// dynamic lookahead).
    pub adaptive: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
    #[doc(hidden)]
    pub rule: AcceptRule,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecStats {
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Per draft position i (0-based): (accepted, tried).
    pub per_position: Vec<(usize, usize)>,
    pub draft_seconds: f64,
    pub target_seconds: f64,
    pub draft_forwards: usize,
    pub target_forwards: usize,
    pub tokens: usize,
    pub seconds: f64,
}

impl SpecStats {
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
    /// Drafted tokens accepted per round.
    pub fn accepted_per_round(&self) -> f64 {
        self.accepted as f64 / self.rounds.max(1) as f64
    }
    /// Tokens produced per round (accepted drafts plus the target's own token).
    pub fn tokens_per_round(&self) -> f64 {
        self.tokens as f64 / self.rounds.max(1) as f64
    }
    pub fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
    /// Add another run's counts and times to these (totals over several prompts).
    pub fn add(&mut self, s: &SpecStats) {
        self.rounds += s.rounds;
        self.drafted += s.drafted;
        self.accepted += s.accepted;
        self.tokens += s.tokens;
        self.seconds += s.seconds;
        self.draft_seconds += s.draft_seconds;
        self.target_seconds += s.target_seconds;
        self.draft_forwards += s.draft_forwards;
        self.target_forwards += s.target_forwards;
        for (i, (acc, tried)) in s.per_position.iter().enumerate() {
            if self.per_position.len() <= i {
                self.per_position.push((0, 0));
            }
            self.per_position[i].0 += acc;
            self.per_position[i].1 += tried;
        }
    }

    pub fn per_position_rates(&self) -> Vec<f64> {
        self.per_position.iter().map(|(a, t)| if *t == 0 { 0.0 } else { *a as f64 / *t as f64 }).collect()
    }
}

/// Expected speedup for acceptance rate `alpha`, draft length `k` and cost ratio `c` (draft forward time over
/// target forward time): (1 − α^(k+1)) / ((1 − α)(k·c + 1)).
pub fn theoretical_speedup(alpha: f64, k: usize, c: f64) -> f64 {
    let a = alpha.clamp(0.0, 0.999_999);
    (1.0 - a.powi(k as i32 + 1)) / ((1.0 - a) * (k as f64 * c + 1.0))
}

/// Check that draft and target tokenize alike and that their vocabularies differ at most by padding rows.
/// Returns the shared vocabulary size (ids beyond it are masked out).
pub fn check_compatible(draft: (&Model, Option<&Tokenizer>), target: (&Model, Option<&Tokenizer>)) -> Result<usize> {
    let (dv, tv) = (draft.0.config().vocab_size, target.0.config().vocab_size);
    if let (Some(dt), Some(tt)) = (draft.1, target.1) {
        if dt.vocab_size() != tt.vocab_size() {
            bail!(
                "draft and target tokenizers differ ({} vs {} tokens): speculative decoding needs one shared tokenizer",
                dt.vocab_size(),
                tt.vocab_size()
            );
        }
        for probe in [
            "Hello world",
            " The quick brown fox jumps over the lazy dog.",
            "def f(x):\n    return x * 2",
            "Ünïcödé 123 日本",
        ] {
            if dt.encode(probe, false)? != tt.encode(probe, false)? {
                bail!("draft and target tokenizers give different ids for {probe:?}: they must share a tokenizer");
            }
        }
        return Ok(dt.vocab_size().min(dv).min(tv));
    }
    // Without tokenizers (random weights), vocabularies may differ only by padding (a multiple of 64 apart).
    let (lo, hi) = (dv.min(tv), dv.max(tv));
    if hi - lo >= 128 {
        bail!("draft vocabulary {dv} and target vocabulary {tv} differ by more than padding");
    }
    Ok(lo)
}

pub struct SpeculativeDecoder<'a> {
    draft: &'a Model,
    target: &'a Model,
    pub dcache: KvCache,
    pub tcache: KvCache,
    /// Prompt plus everything generated; each cache holds a prefix of it.
    pub seq: Vec<u32>,
    pub prompt_len: usize,
    vocab: usize,
    params: SpecParams,
    k: usize,
    /// The same temperature / top-k / top-p filter for draft and target, and the seeded random stream.
    sampler: Sampler,
    pub stats: SpecStats,
    pub done: bool,
}

fn row(logits: &candle_core::Tensor, i: usize, vocab: usize) -> Result<Vec<f32>> {
    let mut v = logits.get(i)?.to_vec1::<f32>()?;
    v.truncate(vocab);
    Ok(v)
}

impl<'a> SpeculativeDecoder<'a> {
    pub fn new(draft: &'a Model, target: &'a Model, vocab: usize, prompt: &[u32], params: SpecParams) -> Result<Self> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the shared vocabulary of {vocab}");
        }
        let ctx = draft.config().max_position_embeddings.min(target.config().max_position_embeddings);
        if prompt.len() >= ctx {
            bail!("the prompt has {} tokens but the context window is {ctx}", prompt.len());
        }
        let sampler = Sampler::new(params.sampling.clone());
        Ok(Self {
            draft,
            target,
            dcache: draft.new_cache(),
            tcache: target.new_cache(),
            seq: prompt.to_vec(),
            prompt_len: prompt.len(),
            vocab,
            k: params.k.max(1),
            params,
            sampler,
            stats: SpecStats::default(),
            done: false,
        })
    }

    pub fn generated(&self) -> &[u32] {
        &self.seq[self.prompt_len..]
    }

    /// One round: draft k tokens, verify them with one target forward, accept, roll both caches back.
    pub fn round(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let start = Instant::now();
        let remaining = self.params.max_tokens.saturating_sub(self.generated().len());
        let ctx_left = self.tcache.max_len().min(self.dcache.max_len()).saturating_sub(self.seq.len() + 1);
        let k = self.k.min(remaining.saturating_sub(1)).min(ctx_left);

        // Draft: catch the draft cache up with the sequence, then propose k tokens.
        let t0 = Instant::now();
        let mut drafts = Vec::with_capacity(k);
        let mut qs: Vec<Option<Vec<f32>>> = Vec::with_capacity(k);
        let mut feed: Vec<u32> = self.seq[self.dcache.len()..].to_vec();
        for _ in 0..k {
            let logits = self.draft.forward_last(&self.draft.input(&feed)?, &mut self.dcache)?.squeeze(0)?;
            self.stats.draft_forwards += 1;
            let mut l = logits.to_vec1::<f32>()?;
            l.truncate(self.vocab);
            let q = self.sampler.distribution(&l);
            let x = match &q {
                Some(q) => self.sampler.draw(q),
                None => argmax(&l),
            };
            drafts.push(x);
            qs.push(q);
            feed = vec![x];
        }
        self.stats.draft_seconds += t0.elapsed().as_secs_f64();

        // Target: score the pending tokens and all drafts in one forward.
        let t1 = Instant::now();
        let pending = self.seq.len() - self.tcache.len();
        let mut input: Vec<u32> = self.seq[self.tcache.len()..].to_vec();
        input.extend(&drafts);
        let logits = self.target.forward(&self.target.input(&input)?, &mut self.tcache)?.squeeze(0)?;
        self.stats.target_forwards += 1;
        self.stats.target_seconds += t1.elapsed().as_secs_f64();
        // Row pending-1+i holds the target's prediction for drafts[i]; the last row is the bonus position.
        let base = pending - 1;

        let mut accepted = 0;
        let mut extra = None;
        for (i, &x) in drafts.iter().enumerate() {
            if self.stats.per_position.len() <= i {
                self.stats.per_position.push((0, 0));
            }
            self.stats.per_position[i].1 += 1;
            let p_logits = row(&logits, base + i, self.vocab)?;
            let ok = match (self.sampler.distribution(&p_logits), &qs[i]) {
                (None, _) => argmax(&p_logits) == x,
                (Some(p), Some(q)) => {
                    let (px, qx) = (p[x as usize] as f64, q[x as usize] as f64);
                    let ok = match self.params.rule {
                        AcceptRule::Correct => self.sampler.uniform() < (px / qx).min(1.0),
                        AcceptRule::AlwaysAccept => true,
                    };
                    if !ok {
                        // Resample from the residual max(0, p − q), normalised.
                        let mut r: Vec<f32> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
                        if r.iter().sum::<f32>() <= 0.0 {
                            r = p.clone();
                        }
                        extra = Some(self.sampler.draw(&r));
                    }
                    ok
                }
                (Some(_), None) => unreachable!("draft and target share sampling settings"),
            };
            if !ok {
                if extra.is_none() {
                    extra = Some(argmax(&p_logits));
                }
                break;
            }
            accepted += 1;
            self.stats.per_position[i].0 += 1;
        }
        let extra = match extra {
            Some(e) => e,
            None => {
                let p_logits = row(&logits, base + drafts.len(), self.vocab)?;
                match self.sampler.distribution(&p_logits) {
                    Some(p) => self.sampler.draw(&p),
                    None => argmax(&p_logits),
                }
            }
        };
        self.stats.rounds += 1;
        self.stats.drafted += drafts.len();
        self.stats.accepted += accepted;

        // New tokens, cut at EOS and the token limit.
        let mut new: Vec<u32> = drafts[..accepted].to_vec();
        new.push(extra);
        if let Some(pos) = new.iter().position(|t| self.params.eos_ids.contains(t)) {
            new.truncate(pos);
            self.done = true;
        }
        new.truncate(remaining);
        let before = self.seq.len();
        self.seq.extend(&new);
        self.stats.tokens += new.len();
        if self.generated().len() >= self.params.max_tokens
            || self.seq.len() + 1 >= self.tcache.max_len().min(self.dcache.max_len())
        {
            self.done = true;
        }
        // Roll back: each cache keeps only tokens of the accepted sequence (the newest token stays pending).
        let keep = (before + accepted).min(self.seq.len().saturating_sub(1));
        self.tcache.truncate(keep);
        self.dcache.truncate(keep);

        if self.params.adaptive {
            self.k = if accepted == drafts.len() && !drafts.is_empty() {
                (self.k + 2).min(16)
            } else {
                self.k.saturating_sub(1).max(1)
            };
        }
        self.stats.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Start from caches that already hold a prefix of the prompt (e.g. a shared prefix computed once).
    pub fn with_caches(mut self, dcache: KvCache, tcache: KvCache) -> Self {
        self.dcache = dcache;
        self.tcache = tcache;
        self
    }

    /// Run rounds until EOS, the token limit or the context end; returns the generated ids.
    pub fn run(&mut self) -> Result<Vec<u32>> {
        // Prefill both models with the prompt (all but its last token, which the first round feeds), skipping
        // whatever the caches already hold.
        let t = Instant::now();
        let end = self.seq.len() - 1;
        if self.dcache.len() < end {
            let t0 = Instant::now();
            self.draft.forward_last(&self.draft.input(&self.seq[self.dcache.len()..end])?, &mut self.dcache)?;
            self.stats.draft_seconds += t0.elapsed().as_secs_f64();
        }
        if self.tcache.len() < end {
            let t1 = Instant::now();
            self.target.forward_last(&self.target.input(&self.seq[self.tcache.len()..end])?, &mut self.tcache)?;
            self.stats.target_seconds += t1.elapsed().as_secs_f64();
        }
        self.stats.seconds += t.elapsed().as_secs_f64();
        if self.params.max_tokens == 0 {
            self.done = true;
        }
        while !self.done {
            self.round()?;
        }
        Ok(self.generated().to_vec())
    }
}

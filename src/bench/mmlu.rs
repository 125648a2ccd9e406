//! MMLU scored as lm-evaluation-harness scores its `mmlu` task: k-shot prompts from the subject's dev rows in
//! file order, the choice whose continuation (" A" … " D") has the highest log-likelihood, continuation tokens
//! taken as the tail of the encoding of context + continuation. Within a subject every prompt shares the
//! few-shot prefix: its KV cache is computed once. Batched (the default), the questions then run many per
//! forward pass, sorted by length, every row attending to the one shared prefix; one row at a time, the cache
//! is rolled back to the prefix after each question.

use super::records::{GroupScore, MmluRecord};
use crate::load::LoadedModel;
use crate::model::linear::ExactScoring;
use crate::model::KvCache;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Questions per forward pass: a number, or as many as fit the device's free memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Auto,
    Rows(usize),
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(BatchSize::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("expected a number of rows ≥ 1 or `auto`, got `{s}`")),
                Ok(n) => Ok(BatchSize::Rows(n)),
            },
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Auto => f.write_str("auto"),
            BatchSize::Rows(n) => write!(f, "{n}"),
        }
    }
}

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Debug, Clone)]
pub struct Question {
    pub question: String,
    pub choices: [String; 4],
    /// 0..4
    pub answer: usize,
}

#[derive(Debug, Clone)]
pub struct Subject {
    pub name: String,
    pub dev: Vec<Question>,
    pub test: Vec<Question>,
}

fn read_csv(path: &Path) -> Result<Vec<Question>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {} is not valid CSV", path.display(), i + 1))?;
        if rec.len() != 6 {
            bail!("{}: row {} has {} fields, expected 6 (question,A,B,C,D,answer)", path.display(), i + 1, rec.len());
        }
        let answer = LETTERS
            .iter()
            .position(|l| *l == rec[5].trim())
            .with_context(|| format!("{}: row {}: answer `{}` is not A-D", path.display(), i + 1, &rec[5]))?;
        out.push(Question {
            question: rec[0].to_string(),
            choices: [rec[1].to_string(), rec[2].to_string(), rec[3].to_string(), rec[4].to_string()],
            answer,
        });
    }
    Ok(out)
}

/// Subjects from a hendrycks-layout folder (`dev/<s>_dev.csv`, `test/<s>_test.csv`), sorted by name.
pub fn load_dir(dir: &Path, only: Option<&[String]>) -> Result<Vec<Subject>> {
    let test_dir = dir.join("test");
    let mut names: Vec<String> = std::fs::read_dir(&test_dir)
        .with_context(|| format!("--mmlu-dir {}: no test/ folder", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix("_test.csv").map(String::from))
        .collect();
    names.sort();
    if let Some(only) = only {
        for s in only {
            if !names.contains(s) {
                bail!("--subjects: unknown subject `{s}` (known: {})", names.join(", "));
            }
        }
        names.retain(|n| only.contains(n));
    }
    names
        .into_iter()
        .map(|name| {
            Ok(Subject {
                dev: read_csv(&dir.join("dev").join(format!("{name}_dev.csv")))?,
                test: read_csv(&test_dir.join(format!("{name}_test.csv")))?,
                name,
            })
        })
        .collect()
}

fn format_question(q: &Question) -> String {
    let mut s = format!("{}\n", q.question.trim());
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("{l}. {c}\n"));
    }
    s.push_str("Answer:");
    s
}

/// The few-shot prefix: header plus `shots` solved dev questions.
pub fn fewshot_prefix(subject: &Subject, shots: usize) -> String {
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.name.replace('_', " ")
    );
    for q in subject.dev.iter().take(shots) {
        s.push_str(&format_question(q));
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// The full prompt (context) for a test question, ending in "Answer:".
pub fn prompt(subject: &Subject, shots: usize, q: &Question) -> String {
    fewshot_prefix(subject, shots) + &format_question(q)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuestionResult {
    pub predicted: usize,
    pub answer: usize,
    /// Log-likelihood of each choice's continuation.
    pub loglik: [f64; 4],
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SubjectResult {
    pub subject: String,
    pub group: String,
    pub questions: usize,
    pub correct: usize,
    #[serde(deserialize_with = "super::records::f64_or_nan")]
    pub accuracy: f64,
    /// Mean log-likelihood of the correct answer (a finer quality signal than accuracy).
    #[serde(deserialize_with = "super::records::f64_or_nan")]
    pub mean_loglik_correct: f64,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

pub struct Scorer<'a> {
    loaded: &'a LoadedModel,
    tok: &'a Tokenizer,
    cache: KvCache,
    cached: Vec<u32>,
    /// Reuse the shared prefix's KV cache (off: recompute every prompt, for comparison).
    pub reuse_prefix: bool,
    /// Tokens actually run through the model (a measure of the work prefix reuse saves).
    pub tokens_processed: usize,
    /// Scores that do not depend on the pass's shape (CPU quantized weights).
    _exact: ExactScoring,
}

impl<'a> Scorer<'a> {
    pub fn new(loaded: &'a LoadedModel) -> Result<Self> {
        Ok(Self {
            loaded,
            tok: loaded.tokenizer()?,
            cache: loaded.model.new_cache(),
            cached: vec![],
            reuse_prefix: true,
            tokens_processed: 0,
            _exact: ExactScoring::hold(),
        })
    }

    /// Run `tokens` keeping whatever prefix the cache already holds; returns logits for positions
    /// `from..tokens.len()` (rows) with `from` ≥ the reused length.
    fn logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<Vec<f32>>> {
        let mut keep =
            if self.reuse_prefix { self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count() } else { 0 };
        keep = keep.min(from).min(tokens.len() - 1);
        self.cache.truncate(keep);
        self.cached.truncate(keep);
        let model = &self.loaded.model;
        // Only the positions asked for go through the head (a question's context is ~100 tokens, its
        // continuation one or two).
        let tail = tokens.len() - from;
        let logits = model.forward_tail(&model.input(&tokens[keep..])?, &mut self.cache, tail)?.squeeze(0)?;
        self.tokens_processed += tokens.len() - keep;
        self.cached.extend_from_slice(&tokens[keep..]);
        (0..tail).map(|i| Ok(logits.get(i)?.to_vec1::<f32>()?)).collect()
    }

    /// Make the cache hold `prefix` computed afresh, as at the start of a chunk of questions: what a question
    /// reuses then does not depend on the questions scored before it, so a chunk scores the same on any rank.
    pub fn restart(&mut self, prefix: &str) -> Result<()> {
        // A new cache: one that grew while scoring earlier questions lays its columns out differently.
        self.cache = self.loaded.model.new_cache();
        self.cached.clear();
        self.prime(prefix)
    }

    /// Make the cache hold `prefix` (called once per subject).
    pub fn prime(&mut self, prefix: &str) -> Result<()> {
        if !self.reuse_prefix {
            return Ok(());
        }
        let toks = self.tok.encode(prefix, false)?;
        // A prefix that does not fit the window is truncated per question instead; nothing to share.
        if toks.len() > 1 && toks.len() < self.cache.max_len() {
            self.logits_from(&toks, toks.len() - 1)?;
        }
        Ok(())
    }

    /// `q` scored alone: each answer letter's log-likelihood after `context` (the question's prompt).
    pub fn answer(&mut self, q: &Question, context: &str) -> Result<QuestionResult> {
        let continuations = LETTERS.map(|l| format!(" {l}"));
        let ll = self.loglik(context, &continuations)?;
        Ok(answer(q, [ll[0], ll[1], ll[2], ll[3]]))
    }

    /// Log-likelihood of `continuation` after `context`, as lm-evaluation-harness computes it (a context
    /// longer than the model's window loses its oldest tokens, as the harness truncates from the left).
    pub fn loglik(&mut self, context: &str, continuations: &[String]) -> Result<Vec<f64>> {
        let window = self.cache.max_len();
        let full_ctx = self.tok.encode(context, false)?;
        let mut ctx: &[u32] = &full_ctx;
        let mut out = vec![];
        let mut last_row: Option<Vec<f64>> = None;
        for cont in continuations {
            let mut whole = self.tok.encode(&format!("{context}{cont}"), false)?;
            let cont_len = whole.len().saturating_sub(full_ctx.len());
            if whole.len() > window {
                let cut = whole.len() - window;
                whole.drain(..cut);
                ctx = &full_ctx[cut.min(full_ctx.len())..];
            }
            let cont_toks = &whole[whole.len() - cont_len.min(whole.len())..];
            if cont_toks.is_empty() {
                bail!("continuation {cont:?} adds no tokens");
            }
            // The common case: one continuation token after an unchanged context — one shared forward.
            if cont_toks.len() == 1 && whole[..ctx.len()] == *ctx {
                if last_row.is_none() {
                    let rows = self.logits_from(ctx, ctx.len() - 1)?;
                    last_row = Some(log_softmax(&rows[0]));
                }
                out.push(last_row.as_ref().expect("set above")[cont_toks[0] as usize]);
                continue;
            }
            let start = whole.len() - cont_toks.len();
            let rows = self.logits_from(&whole[..whole.len() - 1], start - 1)?;
            let ll: f64 = rows.iter().zip(cont_toks).map(|(r, &t)| log_softmax(r)[t as usize]).sum();
            out.push(ll);
        }
        Ok(out)
    }
}

/// Per-question results of one subject.
pub type SubjectDetails = (String, Vec<QuestionResult>);

/// What [`evaluate`] did: per-subject results, every question's result, the tokens run through the model, and
/// whether Ctrl-C cut it short.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub results: Vec<SubjectResult>,
    pub details: Vec<SubjectDetails>,
    pub tokens_run: usize,
    pub interrupted: bool,
    /// The most questions run in one forward pass.
    pub batch_rows: usize,
}

/// Every subject's questions, each `Some` once scored (a question left out — another rank's, or not reached
/// before Ctrl-C — stays `None`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Scored {
    pub per_subject: Vec<Vec<Option<QuestionResult>>>,
    pub tokens_run: usize,
    pub batch_rows: usize,
    pub interrupted: bool,
}

impl Scored {
    /// The evaluation of the questions scored, subject by subject (a subject without any is left out).
    fn into_evaluation(self, subjects: &[Subject], groups: &BTreeMap<String, String>) -> Evaluation {
        let mut out = Evaluation {
            tokens_run: self.tokens_run,
            interrupted: self.interrupted,
            batch_rows: self.batch_rows,
            ..Default::default()
        };
        for (s, answered) in subjects.iter().zip(self.per_subject) {
            out.add_subject(s, groups, answered.into_iter().flatten().collect());
        }
        out
    }

    /// Several ranks' shares as one: each question from the rank that scored it.
    fn merge(parts: Vec<Scored>) -> Scored {
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or_default();
        for part in parts {
            for (mine, theirs) in out.per_subject.iter_mut().zip(part.per_subject) {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    if m.is_none() {
                        *m = t;
                    }
                }
            }
            out.tokens_run += part.tokens_run;
            out.batch_rows = out.batch_rows.max(part.batch_rows);
            out.interrupted |= part.interrupted;
        }
        out
    }
}

/// Which rank scores each chunk of [`PLAN_CHUNK`] questions of each subject: whole chunks (so every question
/// runs in the batch it runs in on one rank, and the results are the same), balanced by the chunks' question
/// tokens plus the few-shot prefix each rank computes for a subject it has a chunk of.
pub fn shard(
    tok: &Tokenizer,
    subjects: &[Subject],
    shots: usize,
    limit: Option<usize>,
    world: usize,
) -> Result<Vec<Vec<usize>>> {
    let mut costs = vec![];
    let mut chunks_of = vec![];
    for s in subjects {
        let n = limit.unwrap_or(s.test.len()).min(s.test.len());
        let prefix = tok.encode(&fewshot_prefix(s, shots), false)?.len();
        let mut chunks = 0;
        for part in s.test[..n].chunks(PLAN_CHUNK) {
            let mut cost = prefix;
            for q in part {
                // Each question runs its own tokens and attends over the prefix.
                cost += tok.encode(&format_question(q), false)?.len();
            }
            costs.push(cost);
            chunks += 1;
        }
        chunks_of.push(chunks);
    }
    let owners = crate::dist::shard::assign(&costs, world);
    let mut at = 0;
    Ok(chunks_of
        .into_iter()
        .map(|n| {
            at += n;
            owners[at - n..at].to_vec()
        })
        .collect())
}

/// The questions rank `rank` scores under [`shard`]'s assignment.
pub fn questions_of(owners: &[Vec<usize>], subjects: &[Subject], limit: Option<usize>, rank: usize) -> usize {
    subjects
        .iter()
        .zip(owners)
        .map(|(s, chunks)| {
            let n = limit.unwrap_or(s.test.len()).min(s.test.len());
            chunks
                .iter()
                .enumerate()
                .filter(|(_, &r)| r == rank)
                .map(|(c, _)| (n - c * PLAN_CHUNK).min(PLAN_CHUNK))
                .sum::<usize>()
        })
        .sum()
}

/// Score `limit` test questions (all when `None`) of every subject. Once `interrupted` is set no further
/// question starts: the subject being scored keeps the questions answered so far, later subjects are left out.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    loaded: &LoadedModel,
    subjects: &[Subject],
    shots: usize,
    limit: Option<usize>,
    groups: &BTreeMap<String, String>,
    reuse_prefix: bool,
    batch: BatchSize,
    interrupted: &AtomicBool,
    progress: impl FnMut(usize),
) -> Result<Evaluation> {
    let one = crate::dist::Group::single();
    evaluate_ranks(&one, None, loaded, subjects, shots, limit, groups, reuse_prefix, batch, interrupted, progress)
}

/// [`evaluate`] over the ranks of `group`: each scores the chunks `owners` ([`shard`]) gives it (`None`: every
/// chunk, for a group of one), and every rank gets the whole evaluation, the same as one rank's.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_ranks(
    group: &crate::dist::Group,
    owners: Option<&[Vec<usize>]>,
    loaded: &LoadedModel,
    subjects: &[Subject],
    shots: usize,
    limit: Option<usize>,
    groups: &BTreeMap<String, String>,
    reuse_prefix: bool,
    batch: BatchSize,
    interrupted: &AtomicBool,
    progress: impl FnMut(usize),
) -> Result<Evaluation> {
    let rank = group.rank();
    let mine = |s: usize, c: usize| owners.is_none_or(|o| o[s][c] == rank);
    let scored = score(loaded, subjects, shots, limit, reuse_prefix, batch, interrupted, progress, &mine)?;
    let scored = if group.world() > 1 { Scored::merge(group.all_gather_json(&scored)?) } else { scored };
    Ok(scored.into_evaluation(subjects, groups))
}

/// The questions of the chunks `mine(subject, chunk)` picks.
#[allow(clippy::too_many_arguments)]
fn score(
    loaded: &LoadedModel,
    subjects: &[Subject],
    shots: usize,
    limit: Option<usize>,
    reuse_prefix: bool,
    batch: BatchSize,
    interrupted: &AtomicBool,
    mut progress: impl FnMut(usize),
    mine: &dyn Fn(usize, usize) -> bool,
) -> Result<Scored> {
    let _exact = ExactScoring::hold();
    // On the CPU one question at a time through our own pass (the few-shot prefix cached once, each question
    // on top of it) outruns batches of rows through tensor ops: `auto` takes it there.
    let one_at_a_time = batch == BatchSize::Rows(1) || batch == BatchSize::Auto && loaded.model.device().is_cpu();
    if reuse_prefix && !one_at_a_time {
        return score_batched(loaded, subjects, shots, limit, batch, interrupted, progress, mine);
    }
    let mut scorer = Scorer::new(loaded)?;
    scorer.reuse_prefix = reuse_prefix;
    let mut out = Scored { batch_rows: 1, ..Default::default() };
    for (si, s) in subjects.iter().enumerate() {
        let n = limit.unwrap_or(s.test.len()).min(s.test.len());
        let mut per_q = vec![None; n];
        if out.interrupted || interrupted.load(Ordering::Relaxed) {
            out.interrupted = true;
            out.per_subject.push(per_q);
            continue;
        }
        let prefix = fewshot_prefix(s, shots);
        for (i, q) in s.test[..n].iter().enumerate() {
            if !mine(si, i / PLAN_CHUNK) {
                continue;
            }
            if interrupted.load(Ordering::Relaxed) {
                out.interrupted = true;
                break;
            }
            if i % PLAN_CHUNK == 0 {
                scorer.restart(&prefix)?;
            }
            let context = prefix.clone() + &format_question(q);
            per_q[i] = Some(scorer.answer(q, &context)?);
            progress(1);
        }
        out.per_subject.push(per_q);
    }
    out.tokens_run = scorer.tokens_processed;
    Ok(out)
}

impl Evaluation {
    /// Record a subject's answered questions (nothing when none was answered).
    fn add_subject(&mut self, s: &Subject, groups: &BTreeMap<String, String>, per_q: Vec<QuestionResult>) {
        let answered = per_q.len();
        if answered == 0 {
            return;
        }
        let correct = per_q.iter().filter(|r| r.predicted == r.answer).count();
        self.results.push(SubjectResult {
            subject: s.name.clone(),
            group: groups.get(&s.name).cloned().unwrap_or_else(|| "other".into()),
            questions: answered,
            correct,
            accuracy: correct as f64 / answered as f64,
            mean_loglik_correct: per_q.iter().map(|r| r.loglik[r.answer]).sum::<f64>() / answered as f64,
        });
        self.details.push((s.name.clone(), per_q));
    }
}

fn answer(q: &Question, ll: [f64; 4]) -> QuestionResult {
    let predicted = (0..4).max_by(|&a, &b| ll[a].partial_cmp(&ll[b]).unwrap_or(std::cmp::Ordering::Equal)).unwrap_or(0);
    QuestionResult { predicted, answer: q.answer, loglik: ll }
}

/// A question scored in one batched forward pass: its tokens after the shared prefix and the token of each
/// answer letter.
struct Planned {
    question: usize,
    suffix: Vec<u32>,
    letters: [u32; 4],
    /// The context lost its first tokens to the window (so it does not begin with the shared prefix).
    truncated: bool,
}

/// A question's tokens and its letters' tokens, when one forward pass scores it (the harness's general case —
/// a continuation of several tokens — is scored alone). A context longer than the window keeps its last
/// tokens, as the harness cuts context + continuation from the left; such a question shares no prefix.
fn plan(tok: &Tokenizer, context: &str, window: usize, question: usize) -> Result<Option<Planned>> {
    let ctx = tok.encode(context, false)?;
    let mut letters = [0u32; 4];
    for (slot, l) in letters.iter_mut().zip(LETTERS) {
        let whole = tok.encode(&format!("{context} {l}"), false)?;
        if whole.len() != ctx.len() + 1 || whole[..ctx.len()] != *ctx {
            return Ok(None);
        }
        *slot = whole[ctx.len()];
    }
    let cut = (ctx.len() + 1).saturating_sub(window);
    Ok(Some(Planned { question, suffix: ctx[cut..].to_vec(), letters, truncated: cut > 0 }))
}

/// Questions planned per round of batches.
const PLAN_CHUNK: usize = 512;

/// [`plan`] for every context, spread over the cores; `(question, plan)` in order, numbered from `first`.
fn plan_all(
    tok: &Tokenizer,
    contexts: &[String],
    window: usize,
    first: usize,
) -> Result<Vec<(usize, Option<Planned>)>> {
    let per = crate::util::items_per_thread(contexts.len());
    std::thread::scope(|scope| {
        let workers: Vec<_> = contexts
            .chunks(per)
            .enumerate()
            .map(|(w, part)| {
                scope.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(j, c)| {
                            let i = first + w * per + j;
                            Ok((i, plan(tok, c, window, i)?))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = vec![];
        for w in workers {
            all.extend(w.join().map_err(|_| anyhow::anyhow!("a tokenizer thread panicked"))??);
        }
        Ok(all)
    })
}

/// How many of the prefix's tokens a subject's questions share: the count that most questions' encodings begin
/// with (the prefix's last tokens may merge with a question's first characters, as "\n\n" + "Which" does in
/// byte-level BPE).
fn split_shared_len(prefix: &[u32], planned: &[Planned]) -> usize {
    let mut lens: Vec<usize> = planned
        .iter()
        .filter(|p| !p.truncated)
        .map(|p| p.suffix.iter().zip(prefix).take_while(|(a, b)| a == b).count())
        .collect();
    lens.sort_unstable();
    lens.get(lens.len() / 2).copied().unwrap_or(0)
}

/// Keep the questions that begin with the prefix's first `shared` tokens (and have tokens after them), cut to
/// their tokens after it; return the others, to be scored alone.
fn keep_shared(prefix: &[u32], shared: usize, planned: &mut Vec<Planned>) -> Vec<usize> {
    let mut alone = vec![];
    planned.retain_mut(|p| {
        if p.truncated {
            true
        } else if shared > 0 && p.suffix.len() > shared && p.suffix[..shared] == prefix[..shared] {
            p.suffix.drain(..shared);
            true
        } else {
            alone.push(p.question);
            false
        }
    });
    alone
}

/// Rows per forward pass for questions of up to `longest` tokens after a prefix of `prefix` tokens. The
/// attention scores of a pass are materialized (`[rows, heads, tokens, prefix + tokens]`): passes are kept to
/// about [`PASS_TOKENS`] tokens and [`PASS_SCORE_BYTES`] of scores, which measured fastest (wider passes of long
/// questions ran slower), and within half the device's free memory. At most 8 rows on the CPU.
pub fn auto_rows(
    cfg: &crate::model::ModelConfig,
    dtype: DType,
    device: &Device,
    prefix: usize,
    longest: usize,
) -> usize {
    let t = longest.max(1);
    let elem = dtype.size_in_bytes().max(2);
    let scores = cfg.num_heads * t * (prefix + t) * elem;
    let per_row = 4 * scores + 4 * t * cfg.intermediate_size * elem + 12 * t * cfg.hidden_size * elem;
    let (budget, most) = match crate::util::gpu_memory_free_bytes(device) {
        Some(free) => (free / 2, 256),
        // On the CPU `auto` scores one question at a time (see `score`); 8 rows measured fastest of the
        // batched passes (an explicit `--batch-size`).
        None => (2usize << 30, 8),
    };
    let by_memory = budget / per_row.max(1);
    let by_tokens = PASS_TOKENS / t;
    let by_scores = PASS_SCORE_BYTES / scores.max(1);
    by_memory.min(by_tokens).min(by_scores).clamp(1, most)
}

/// Tokens per batched scoring pass (see [`auto_rows`]).
const PASS_TOKENS: usize = 8192;
/// Bytes of attention scores per batched scoring pass (see [`auto_rows`]).
const PASS_SCORE_BYTES: usize = 1 << 30;

/// Every subject batched: the few-shot prefix runs once into a shared cache, then the questions run sorted by
/// length, `batch` rows per forward pass, each row's last position scoring the four letters. Only the chunks
/// `mine(subject, chunk)` picks are scored.
#[allow(clippy::too_many_arguments)]
fn score_batched(
    loaded: &LoadedModel,
    subjects: &[Subject],
    shots: usize,
    limit: Option<usize>,
    batch: BatchSize,
    interrupted: &AtomicBool,
    mut progress: impl FnMut(usize),
    mine: &dyn Fn(usize, usize) -> bool,
) -> Result<Scored> {
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let window = model.config().max_position_embeddings;
    let mut scorer = Scorer::new(loaded)?;
    let mut out = Scored::default();
    let questions_of = |si: usize| {
        let s = &subjects[si];
        &s.test[..limit.unwrap_or(s.test.len()).min(s.test.len())]
    };
    // Each subject's chunks to plan, in order. The first chunk with a question that keeps the prefix decides how
    // many prefix tokens the subject's questions share, so a rank that scores only later chunks still plans the
    // chunks before its first (and scores nothing of them).
    let plans: Vec<Vec<usize>> = (0..subjects.len())
        .map(|si| {
            let owned: Vec<usize> = (0..questions_of(si).len().div_ceil(PLAN_CHUNK)).filter(|&c| mine(si, c)).collect();
            owned.first().map_or(vec![], |&first| (0..first).chain(owned.iter().copied()).collect())
        })
        .collect();
    // Tokenizing is a few seconds of the cores' time over all of MMLU: it runs a chunk ahead of the scoring, across
    // subjects too, so the GPU does not wait for a subject's first chunk.
    let (sender, planned_chunks) = std::sync::mpsc::sync_channel::<Result<Vec<(usize, Option<Planned>)>>>(1);
    let planner = |sender: std::sync::mpsc::SyncSender<_>| {
        for (si, chunks) in plans.iter().enumerate() {
            if chunks.is_empty() {
                continue;
            }
            let prefix_text = fewshot_prefix(&subjects[si], shots);
            let questions = questions_of(si);
            for &c in chunks {
                let part = &questions[c * PLAN_CHUNK..((c + 1) * PLAN_CHUNK).min(questions.len())];
                let contexts: Vec<String> = part.iter().map(|q| prefix_text.clone() + &format_question(q)).collect();
                if sender.send(plan_all(tok, &contexts, window, c * PLAN_CHUNK)).is_err() {
                    return; // the scoring stopped
                }
            }
        }
    };
    // Every subject's answers, filled as the scores come back (subjects after an interruption stay empty).
    out.per_subject = (0..subjects.len()).map(|si| vec![None; questions_of(si).len()]).collect();
    // On a GPU a chunk's passes are only queued; their scores are read after the next chunk's passes are queued,
    // so the device always has a chunk of work ahead while the host reads, plans and launches (reading them at
    // the end of their own chunk left it idle at every chunk's start). On the CPU, where each pass has finished
    // when it returns, each is read as it is done (progress per pass).
    let queue = model.device().is_cuda();
    let mut pending: Vec<Pending> = vec![];
    let read = |pending: &mut Vec<Pending>, out: &mut Scored, progress: &mut dyn FnMut(usize)| -> Result<()> {
        for p in pending.drain(..) {
            let questions = questions_of(p.subject);
            for (&(qi, tokens), ll) in p.questions.iter().zip(read_scores(&p.scores)?) {
                out.per_subject[p.subject][qi] = Some(answer(&questions[qi], ll));
                out.tokens_run += tokens;
            }
            progress(p.questions.len());
        }
        Ok(())
    };
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || planner(sender));
        let mut planned_chunks = planned_chunks.into_iter();
        for (si, s) in subjects.iter().enumerate() {
            if plans[si].is_empty() || out.interrupted || interrupted.load(Ordering::Relaxed) {
                out.interrupted |= !plans[si].is_empty();
                continue;
            }
            let questions = questions_of(si);
            let prefix_text = fewshot_prefix(s, shots);
            let prefix = tok.encode(&prefix_text, false)?;
            let mut shared_len: Option<usize> = None;
            let mut shared: Option<Arc<crate::model::cache::SharedPrefix>> = None;
            for &c in &plans[si] {
                let planned =
                    planned_chunks.next().ok_or_else(|| anyhow::anyhow!("the tokenizer thread stopped"))??;
                if interrupted.load(Ordering::Relaxed) {
                    out.interrupted = true;
                    break;
                }
                if !mine(si, c) && shared_len.is_some() {
                    continue; // planned only to find the shared length, which is known now
                }
                let mut batched = vec![];
                let mut alone = vec![];
                for (i, planned) in planned {
                    match planned {
                        Some(p) => batched.push(p),
                        None => alone.push(i),
                    }
                }
                let split = shared_len.unwrap_or_else(|| split_shared_len(&prefix, &batched));
                alone.extend(keep_shared(&prefix, split, &mut batched));
                alone.sort_unstable();
                if batched.iter().any(|p| !p.truncated) && shared_len.is_none() {
                    shared_len = Some(split);
                }
                if !mine(si, c) {
                    continue;
                }
                if batched.iter().any(|p| !p.truncated) && shared.is_none() {
                    let mut primed = model.new_cache().with_capacity(split);
                    model.forward_last(&model.input(&prefix[..split])?, &mut primed)?;
                    out.tokens_run += split;
                    shared = Some(Arc::new(primed.share_prefix(split)?));
                }
                // Longest first: similar lengths share a batch (little padding), and the first batch shows whether
                // the widest one fits. Cut contexts (no shared prefix) batch among themselves.
                batched.sort_by_key(|p| (p.truncated, std::cmp::Reverse(p.suffix.len())));
                let mut rest: &[Planned] = &batched;
                let earlier = pending.len();
                while !rest.is_empty() {
                    let truncated = rest[0].truncated;
                    let same = rest.iter().take_while(|p| p.truncated == truncated).count();
                    if interrupted.load(Ordering::Relaxed) {
                        out.interrupted = true;
                        break;
                    }
                    let seen = if truncated { 0 } else { split };
                    let rows = match batch {
                        BatchSize::Rows(n) => n,
                        BatchSize::Auto => {
                            auto_rows(model.config(), model.dtype(), model.device(), seen, rest[0].suffix.len())
                        }
                    };
                    let (part, tail) = rest.split_at(rows.min(same));
                    rest = tail;
                    let prefix_kv = if truncated { None } else { shared.as_ref() };
                    let scores = score_rows(loaded, prefix_kv, part)?;
                    let asked = part.iter().map(|p| (p.question, p.suffix.len())).collect();
                    pending.push(Pending { subject: si, questions: asked, scores });
                    out.batch_rows = out.batch_rows.max(part.len());
                    if !queue {
                        read(&mut pending, &mut out, &mut progress)?;
                    }
                }
                // The chunks before this one are done once this one's passes are queued behind them.
                let this_chunk = pending.split_off(earlier);
                read(&mut pending, &mut out, &mut progress)?;
                pending = this_chunk;
                let mut primed_alone = false;
                for i in alone {
                    if interrupted.load(Ordering::Relaxed) {
                        out.interrupted = true;
                        break;
                    }
                    if !primed_alone {
                        scorer.restart(&prefix_text)?;
                        primed_alone = true;
                    }
                    let context = prefix_text.clone() + &format_question(&questions[i]);
                    out.per_subject[si][i] = Some(scorer.answer(&questions[i], &context)?);
                    progress(1);
                }
                if out.interrupted {
                    break;
                }
            }
            if out.interrupted {
                break;
            }
        }
        // What was queued before an interruption is kept.
        read(&mut pending, &mut out, &mut progress)
    })?;
    out.tokens_run += scorer.tokens_processed;
    Ok(out)
}

/// The scores of one queued pass: its subject, its questions (index, tokens run) and their `[rows, 4]` scores
/// on the device.
struct Pending {
    subject: usize,
    questions: Vec<(usize, usize)>,
    scores: Tensor,
}

/// The four letters' log-likelihoods of each planned question, in one forward pass after the shared prefix
/// (log-softmax on the device): `[rows, 4]` f32 on the model's device, read by [`read_scores`]. Nothing waits
/// for the device here.
fn score_rows(
    loaded: &LoadedModel,
    shared: Option<&Arc<crate::model::cache::SharedPrefix>>,
    rows: &[Planned],
) -> Result<Tensor> {
    let model = &loaded.model;
    let longest = rows.iter().map(|p| p.suffix.len()).max().unwrap_or(1);
    let mut cache = model.new_cache().with_capacity(longest);
    if let Some(shared) = shared {
        cache.set_prefix(shared.clone())?;
    }
    let suffixes: Vec<&[u32]> = rows.iter().map(|p| p.suffix.as_slice()).collect();
    let logits = model.prefill_rows(&suffixes, &mut cache)?; // [rows, vocab] f32
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let letters: Vec<u32> = rows.iter().flat_map(|p| p.letters).collect();
    let letters = Tensor::from_vec(letters, (rows.len(), 4), logits.device())?;
    Ok(logits.gather(&letters, D::Minus1)?.broadcast_sub(&lse)?)
}

/// The `[rows, 4]` scores of [`score_rows`] on the host.
fn read_scores(lls: &Tensor) -> Result<Vec<[f64; 4]>> {
    let ll = lls.to_vec2::<f32>()?;
    Ok(ll.into_iter().map(|r| [r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64]).collect())
}

/// The groups reported, in report order.
pub const GROUP_NAMES: [&str; 4] = ["stem", "humanities", "social_sciences", "other"];

/// Questions, correct answers and accuracy per group, for the groups of [`GROUP_NAMES`] that had questions.
pub fn group_scores(results: &[SubjectResult]) -> BTreeMap<String, GroupScore> {
    let mut out = BTreeMap::new();
    for g in GROUP_NAMES {
        let (questions, correct) =
            results.iter().filter(|r| r.group == g).fold((0, 0), |(n, c), r| (n + r.questions, c + r.correct));
        if questions > 0 {
            out.insert(g.to_string(), GroupScore { questions, correct, accuracy: correct as f64 / questions as f64 });
        }
    }
    out
}

/// The record of one [`evaluate`] run: totals, groups, per-subject results and every prediction.
pub fn summarize(run: Evaluation, shots: usize, prefix_reuse: bool, seconds: f64) -> MmluRecord {
    let Evaluation { results, details, tokens_run, interrupted, batch_rows } = run;
    let questions: usize = results.iter().map(|r| r.questions).sum();
    let correct: usize = results.iter().map(|r| r.correct).sum();
    let mean_loglik_correct =
        results.iter().map(|r| r.mean_loglik_correct * r.questions as f64).sum::<f64>() / questions.max(1) as f64;
    MmluRecord {
        shots,
        questions,
        correct,
        accuracy: correct as f64 / questions.max(1) as f64,
        mean_loglik_correct,
        groups: group_scores(&results),
        subjects: results,
        predictions: details.into_iter().map(|(s, q)| (s, q.iter().map(|r| r.predicted).collect())).collect(),
        seconds,
        questions_per_s: questions as f64 / seconds.max(1e-9),
        prefix_reuse,
        tokens_run,
        batch_rows,
        interrupted,
        extra: Default::default(),
    }
}

/// Subject → group (stem, humanities, social_sciences, other).
pub fn subject_groups() -> BTreeMap<String, String> {
    GROUPS.iter().flat_map(|(g, subjects)| subjects.iter().map(move |s| (s.to_string(), g.to_string()))).collect()
}

/// lm-evaluation-harness's MMLU groups (its `mmlu_<group>` task lists).
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "humanities",
        &[
            "formal_logic",
            "high_school_european_history",
            "high_school_us_history",
            "high_school_world_history",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "moral_disputes",
            "moral_scenarios",
            "philosophy",
            "prehistory",
            "professional_law",
            "world_religions",
        ],
    ),
    (
        "other",
        &[
            "business_ethics",
            "clinical_knowledge",
            "college_medicine",
            "global_facts",
            "human_aging",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "nutrition",
            "professional_accounting",
            "professional_medicine",
            "virology",
        ],
    ),
    (
        "social_sciences",
        &[
            "econometrics",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
            "high_school_psychology",
            "human_sexuality",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
        ],
    ),
    (
        "stem",
        &[
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "electrical_engineering",
            "elementary_mathematics",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_mathematics",
            "high_school_physics",
            "high_school_statistics",
            "machine_learning",
        ],
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn result(subject: &str, group: &str, questions: usize, correct: usize, ll: f64) -> SubjectResult {
        SubjectResult {
            subject: subject.into(),
            group: group.into(),
            questions,
            correct,
            accuracy: correct as f64 / questions.max(1) as f64,
            mean_loglik_correct: ll,
        }
    }

    fn answered(predicted: &[usize]) -> Vec<QuestionResult> {
        predicted.iter().map(|&p| QuestionResult { predicted: p, answer: 0, loglik: [0.0; 4] }).collect()
    }

    #[test]
    fn groups_add_up_their_subjects() {
        let res = [
            result("anatomy", "stem", 4, 3, -1.0),
            result("astronomy", "stem", 6, 1, -2.0),
            result("philosophy", "humanities", 5, 5, -0.5),
            result("empty", "social_sciences", 0, 0, 0.0),
        ];
        let g = group_scores(&res);
        assert_eq!(g.keys().collect::<Vec<_>>(), ["humanities", "stem"], "groups without questions are left out");
        assert_eq!(g["stem"], GroupScore { questions: 10, correct: 4, accuracy: 0.4 });
        assert_eq!(g["humanities"], GroupScore { questions: 5, correct: 5, accuracy: 1.0 });
    }

    #[test]
    fn summary_weights_subjects_by_questions() {
        let res = vec![result("anatomy", "stem", 1, 1, -1.0), result("virology", "other", 3, 0, -3.0)];
        let details = vec![("anatomy".to_string(), answered(&[0])), ("virology".to_string(), answered(&[1, 2, 3]))];
        let run = Evaluation { results: res, details, tokens_run: 9, interrupted: false, batch_rows: 1 };
        let m = summarize(run, 5, true, 2.0);
        assert_eq!((m.shots, m.questions, m.correct), (5, 4, 1));
        assert_eq!(m.accuracy, 0.25);
        assert_eq!(m.mean_loglik_correct, (-1.0 - 9.0) / 4.0);
        assert_eq!(m.questions_per_s, 2.0);
        assert_eq!(m.predictions["virology"], [1, 2, 3]);
        assert_eq!(m.groups["other"].questions, 3);
        assert_eq!(m.subjects.len(), 2);
        assert!(m.prefix_reuse);
        // Nothing asked: no division by zero.
        let none = summarize(Evaluation::default(), 0, false, 0.0);
        assert_eq!((none.accuracy, none.mean_loglik_correct, none.questions_per_s), (0.0, 0.0, 0.0));
        assert!(none.groups.is_empty());
    }
}

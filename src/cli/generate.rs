//! `billion generate`: one prompt in, streamed text out (or one JSON object with `--json`); with `--prompts`,
//! a JSONL file of prompts generated in batches, one JSON line out per prompt in input order.

use super::{LoadArgs, SamplingArgs, StoppedByUser};
use crate::dist::Group;
use crate::generation::batch::{generate_batch, BatchOutput, BatchParams, BatchRequest};
use crate::generation::sampling::SamplingParams;
use crate::generation::{generate, GenerateParams};
use crate::load::device::{device_name, dtype_name};
use crate::load::LoadedModel;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    /// With --json: each generated token's log-probability and the N likeliest tokens at its step (1-20),
    /// from the model's distribution before temperature and penalties
    #[arg(long, value_name = "N", requires = "json", value_parser = clap::value_parser!(u64).range(1..=20))]
    pub top_logprobs: Option<u64>,
    /// Write the logits at every prompt position to this safetensors file (tensor `logits`, f32 [len, vocab])
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Generate for every line of a JSONL file: {"prompt": TEXT, "id"?: ANY, "max_tokens"?: N, "stop"?: TEXT or
    /// [TEXT]}; prints one JSON line per prompt, in input order
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "prompt_ids", "logits_out", "prefill_chunk", "top_logprobs"])]
    pub prompts: Option<PathBuf>,
    /// With --prompts: prompts decoded together (default 16; per rank with --devices)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Option<u64>,
    /// With --prompts: the prompts shared out between GPUs, one contiguous block of lines each
    #[command(flatten)]
    pub dist: super::DistArgs,
}

fn parse_ids(ids: &[String]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|s| s.trim().parse::<u32>().with_context(|| format!("--prompt-ids: `{s}` is not a token id")))
        .collect()
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(path) = &a.prompts {
        return run_prompts(&a, path);
    }
    if a.dist.devices.is_some() {
        bail!("--devices shares the prompts of --prompts FILE.jsonl between GPUs; one prompt runs on one device (--device)");
    }
    if a.batch.is_some() {
        // Checked here: clap waives `requires = "prompts"` when a flag that conflicts with --prompts is given.
        bail!("--batch sets how many prompts of --prompts FILE.jsonl are decoded together; give --prompts too");
    }
    let sampling = a.sampling.params()?;
    if a.prompt.is_none() && a.prompt_ids.is_none() {
        bail!("give --prompt TEXT, --prompt-ids 1,2,3 or --prompts FILE.jsonl");
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
        top_logprobs: a.top_logprobs.unwrap_or(0) as usize,
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
            "logprobs": a.top_logprobs.map(|_| logprobs_json(&gen.logprobs, loaded.tokenizer.as_ref())),
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

/// `[{"id", "token", "logprob", "top": [{"id", "token", "logprob"}]}]`, one entry per generated token
/// (`token`: its text, or null without a tokenizer).
fn logprobs_json(
    steps: &[crate::generation::TokenLogprobs],
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
) -> serde_json::Value {
    let entry = |id: u32, logprob: f32| {
        let text = tokenizer.and_then(|t| t.decode(&[id], false).ok());
        serde_json::json!({ "id": id, "token": text, "logprob": logprob })
    };
    steps
        .iter()
        .map(|s| {
            let mut e = entry(s.id, s.logprob);
            e["top"] = s.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect()
}

fn write_logits(path: &std::path::Path, logits: &candle_core::Tensor) -> Result<()> {
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    crate::util::save_safetensors_atomic(path, &std::collections::HashMap::from([("logits".to_string(), logits)]))
        .context("--logits-out")
}

/// Prompts decoded together when `--batch` is not given.
const DEFAULT_BATCH: u64 = 16;

/// One prompt of a `--prompts` file.
#[derive(Debug, Clone, PartialEq)]
struct PromptRow {
    /// 1-based line in the file.
    line: usize,
    /// Echoed back as given (null when absent).
    id: Value,
    prompt: String,
    max_tokens: Option<usize>,
    stop: Vec<String>,
}

/// Every prompt of a JSONL file; a line that is not a prompt is an error naming `FILE:LINE`.
fn read_prompt_rows(path: &Path) -> Result<Vec<PromptRow>> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("--prompts {shown}: cannot read it"))?;
    let mut rows = vec![];
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|_| anyhow!("--prompts {shown}:{line}: not UTF-8 text"))?;
        if text.trim().is_empty() {
            continue;
        }
        rows.push(parse_prompt_line(text, line).map_err(|why| anyhow!("--prompts {shown}:{line}: {why}"))?);
    }
    if rows.is_empty() {
        bail!("--prompts {shown}: no prompts in it (expected one JSON object per line, such as {{\"prompt\": \"Hello\"}})");
    }
    Ok(rows)
}

/// A value as it appears in the file, cut short for an error message.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

fn parse_prompt_line(text: &str, line: usize) -> std::result::Result<PromptRow, String> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| format!("not JSON ({e}); expected an object such as {{\"prompt\": \"Hello\"}}"))?;
    let Value::Object(mut fields) = v else {
        return Err(format!("expected a JSON object with a \"prompt\" string, got {}", shown(&v)));
    };
    let prompt = match fields.remove("prompt") {
        Some(Value::String(s)) => s,
        None => return Err("no \"prompt\": expected a \"prompt\" string".into()),
        Some(other) => return Err(format!("\"prompt\" must be a string, got {}", shown(&other))),
    };
    let max_tokens = match fields.remove("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|&n| n >= 1).and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Some(n),
            None => return Err(format!("\"max_tokens\" must be a positive integer, got {}", shown(&v))),
        },
    };
    let bad_stop = |v: &Value| format!("\"stop\" must be a string or an array of strings, got {}", shown(v));
    let stop = match fields.remove("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(|| bad_stop(&Value::Array(items.clone()))))
            .collect::<std::result::Result<_, _>>()?,
        Some(other) => return Err(bad_stop(&other)),
    };
    if stop.iter().any(String::is_empty) {
        // An empty stop string would end every reply before its first token.
        return Err("\"stop\" strings must not be empty".into());
    }
    Ok(PromptRow { line, id: fields.remove("id").unwrap_or(Value::Null), prompt, max_tokens, stop })
}

/// The request for one row, or why the row is refused; a truncation note goes to stderr.
fn prepare_row(
    row: &PromptRow,
    index: usize,
    a: &GenerateArgs,
    tokenizer: &Tokenizer,
    context: usize,
    sampling: &SamplingParams,
    file: &str,
) -> std::result::Result<BatchRequest, String> {
    let max_tokens = row.max_tokens.unwrap_or(a.max_tokens);
    let mut prompt = tokenizer.encode(&row.prompt, !a.no_bos).map_err(|e| e.to_string())?;
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    // As the single prompt does with --truncate-prompt: keep the last tokens, leaving room for the answer
    // (and at least one prompt token).
    let keep = context - max_tokens.min(context - 1);
    if a.truncate_prompt && prompt.len() > keep {
        eprintln!(
            "{file}:{}: note: prompt of {} tokens truncated to its last {keep}, leaving room for {} new tokens in the context window of {context}",
            row.line,
            prompt.len(),
            context - keep
        );
        prompt.drain(..prompt.len() - keep);
    } else if prompt.len() >= context {
        return Err(format!(
            "the prompt has {} tokens but the model's context window is {context} and at least one token must be left to generate; shorten it or pass --truncate-prompt to keep the last {keep}",
            prompt.len()
        ));
    }
    let mut stop_strings = a.stop.clone();
    stop_strings.extend(row.stop.iter().cloned());
    // Each row its own seed, so sampled rows differ from one another and a rerun repeats them.
    let sampling = SamplingParams { seed: sampling.seed.wrapping_add(index as u64), ..sampling.clone() };
    Ok(BatchRequest { prompt, max_tokens, stop_strings, sampling })
}

/// Output lines written in input order as soon as every earlier one is written.
struct InOrder {
    next: usize,
    pending: BTreeMap<usize, String>,
    written: usize,
}

impl InOrder {
    fn new() -> Self {
        Self { next: 0, pending: BTreeMap::new(), written: 0 }
    }

    fn put(&mut self, index: usize, line: String) {
        self.pending.insert(index, line);
        let mut ready = vec![];
        while let Some(line) = self.pending.remove(&self.next) {
            ready.push(line);
            self.next += 1;
        }
        self.write(ready);
    }

    /// After an interrupt: what finished, still in input order, past the rows that never ran.
    fn write_rest(&mut self) {
        let rest = std::mem::take(&mut self.pending).into_values().collect();
        self.write(rest);
    }

    fn write(&mut self, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let written = lines.iter().try_for_each(|l| writeln!(out, "{l}")).and_then(|_| out.flush());
        if written.is_err() {
            // stdout was closed (`| head`): nobody reads the rest.
            std::process::exit(crate::util::CLOSED_STDOUT_EXIT);
        }
        self.written += lines.len();
    }
}

/// Ctrl-C stops the rows in progress and keeps what is done; a second Ctrl-C quits at once.
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping the prompts in progress and writing what is done (Ctrl-C again to quit now)"
        );
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(interrupted)
}

/// The JSON line of one generated row: what `--json` prints for one prompt, with the row's id and line.
fn output_line(loaded: &LoadedModel, row: &PromptRow, request: &BatchRequest, out: &BatchOutput) -> String {
    serde_json::json!({
        "id": row.id,
        "line": row.line,
        "model": loaded.source.display().to_string(),
        "architecture": loaded.config().architecture.name(),
        "device": device_name(loaded.model.device()),
        "dtype": dtype_name(loaded.model.dtype()),
        "quantization": loaded.quantization,
        "prompt_tokens": request.prompt,
        "tokens": out.tokens,
        "text": out.text,
        "stop_reason": out.stop_reason,
    })
    .to_string()
}

/// `--prompts FILE.jsonl`: every prompt of the file through the batched generator; with several ranks each
/// generates one contiguous block of the prompts (balanced by prompt tokens plus the token budget) and rank 0
/// writes every line, in input order (its own block as it goes, the others' as they arrive).
fn run_prompts(a: &GenerateArgs, path: &Path) -> Result<()> {
    let sampling = a.sampling.params()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1 with --prompts");
    }
    let launch = a.dist.launch(a.model.device.device)?;
    let rows = read_prompt_rows(path)?;
    let interrupted = interrupt_flag()?;
    let work = |group: &mut Group, device| {
        let mut load = a.model.clone();
        load.device.device = device;
        prompts_rank(a, path, &rows, &sampling, &load, &interrupted, group)
    };
    crate::dist::run(&launch, &work)
}

/// What a rank other than 0 sends back: its output lines by input index, and its counts.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct RankLines {
    lines: Vec<(usize, String)>,
    interrupted: bool,
    stats: crate::generation::batch::BatchStats,
}

/// The requests `[start, end)` of rank `rank` of `world`: contiguous blocks of about equal cost.
fn block_of(costs: &[usize], rank: usize, world: usize) -> (usize, usize) {
    let total: usize = costs.iter().sum();
    let bound = |r: usize| -> usize {
        if r >= world {
            return costs.len();
        }
        let target = total * r / world;
        let mut acc = 0;
        costs
            .iter()
            .take_while(|&&c| {
                let before = acc;
                acc += c;
                before < target
            })
            .count()
    };
    (bound(rank), bound(rank + 1))
}

fn prompts_rank(
    a: &GenerateArgs,
    path: &Path,
    rows: &[PromptRow],
    sampling: &SamplingParams,
    load: &super::LoadArgs,
    interrupted: &Arc<AtomicBool>,
    group: &mut Group,
) -> Result<()> {
    let main = group.is_main();
    let file = path.display().to_string();
    let loaded = load.load()?;
    if group.world() > 1 {
        group.agree("model", &crate::dist::model_fingerprint(&loaded))?;
        let options = format!("{:?} {} {:?} {:?} {}", sampling, a.max_tokens, a.stop, a.batch, a.truncate_prompt);
        group.agree("generation options", &options)?;
        group.agree("prompts", &format!("{} lines", rows.len()))?;
    }
    if let Some(note) = loaded.kept_dense_note().filter(|_| main) {
        eprintln!("note: {note}");
    }
    let tokenizer = loaded.tokenizer().context("--prompts (text prompts need the model's tokenizer)")?;
    let context = loaded.config().max_position_embeddings;
    let mut requests = vec![];
    // The row of each request.
    let mut request_rows = vec![];
    let mut out = InOrder::new();
    let mut refused = vec![];
    for (index, row) in rows.iter().enumerate() {
        match prepare_row(row, index, a, tokenizer, context, sampling, &file) {
            Ok(request) => {
                requests.push(request);
                request_rows.push(index);
            }
            Err(why) => {
                if main {
                    eprintln!("{file}:{}: refused: {why}", row.line);
                    out.put(index, serde_json::json!({"id": row.id, "line": row.line, "error": why}).to_string());
                }
                refused.push(row.line.to_string());
            }
        }
    }
    let refused_error = || {
        let lines = if refused.len() == 1 { "line" } else { "lines" };
        let others = if requests.is_empty() { "none ran" } else { "the others were written" };
        anyhow!(
            "--prompts {file}: {} of {} prompts refused ({lines} {}); {others}",
            refused.len(),
            rows.len(),
            refused.join(", ")
        )
    };
    if requests.is_empty() {
        return Err(refused_error());
    }
    let costs: Vec<usize> = requests.iter().map(|r| r.prompt.len() + r.max_tokens).collect();
    let (start, end) = block_of(&costs, group.rank(), group.world());
    let mine = &requests[start..end];
    let params = BatchParams {
        batch: usize::try_from(a.batch.unwrap_or(DEFAULT_BATCH)).unwrap_or(usize::MAX).min(mine.len()).max(1),
        eos_ids: loaded.eos_ids(),
        interrupt: Some(interrupted.clone()),
    };
    let bar = crate::bench::run::progress_bar(mine.len() as u64, "prompts", !main);
    let mut reported = 0;
    let mut theirs = RankLines::default();
    let stats = generate_batch(&loaded.model, loaded.tokenizer.as_ref(), mine, &params, |k, output| {
        let index = request_rows[start + k];
        let line = output_line(&loaded, &rows[index], &mine[k], &output);
        if main {
            out.put(index, line);
        } else {
            theirs.lines.push((index, line));
        }
        reported += 1;
        bar.inc(1);
        Ok(())
    });
    bar.finish_and_clear();
    let mut stats = stats?;
    if group.world() > 1 {
        theirs.stats = stats.clone();
        theirs.interrupted = interrupted.load(Ordering::Relaxed);
        let all: Vec<RankLines> = group.all_gather_json(&theirs)?;
        // Ctrl-C on any rank: rank 0 writes what every rank finished, past the gaps.
        if all.iter().any(|p| p.interrupted) {
            interrupted.store(true, Ordering::Relaxed);
        }
        if !main {
            return Ok(());
        }
        for part in all.into_iter().skip(1) {
            reported += part.lines.len();
            for (index, line) in part.lines {
                out.put(index, line);
            }
            stats.merge(&part.stats);
        }
    }
    eprintln!(
        "[{} requests, {} prompt tokens, {} generated in {:.2} s: {:.1} tok/s; batch {}{}, load {:.2} s]",
        stats.requests_done,
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.seconds,
        stats.tok_s(),
        params.batch,
        if group.world() > 1 { format!(" per rank × {} ranks", group.world()) } else { String::new() },
        loaded.load_seconds
    );
    if interrupted.load(Ordering::Relaxed) {
        out.write_rest();
        let not_run = requests.len() - reported;
        let refused_note = if refused.is_empty() { String::new() } else { format!(", {} refused", refused.len()) };
        return Err(anyhow::Error::new(StoppedByUser(format!(
            "interrupted: {} of {} prompts written ({not_run} not started{refused_note}); rows stopped early have stop_reason \"interrupted\"",
            out.written,
            rows.len(),
        ))));
    }
    if !refused.is_empty() {
        return Err(refused_error());
    }
    Ok(())
}

#[cfg(test)]
mod block_tests {
    use super::block_of;

    #[test]
    fn blocks_cover_every_request_once_in_order() {
        let costs = [5, 5, 5, 5, 20, 1, 1, 1];
        let blocks: Vec<(usize, usize)> = (0..3).map(|r| block_of(&costs, r, 3)).collect();
        assert_eq!(blocks[0].0, 0);
        assert_eq!(blocks[2].1, costs.len());
        for w in blocks.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        assert_eq!(block_of(&costs, 0, 1), (0, costs.len()));
    }
}

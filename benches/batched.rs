//! Batched decode throughput, as llama.cpp's `llama-batched-bench` reports it: R sequences of P prompt tokens
//! prefilled together, then N decode steps of all R rows; tokens/s = R·N / decode time. With `--mmlu DIR`
//! and / or `--humaneval FILE`: the wall time of a batched MMLU (5-shot, every subject) and of HumanEval's
//! generation (base prompts, greedy unless `--temperature`, `--samples` per problem), each beside the same
//! work one row at a time when `--compare` is given.
//!
//!   cargo bench --bench batched -- --model M [--rows 1,8,32,64,128] [-p 128] [-n 128] [--device cuda]
//!       [--dtype bf16] [--random-weights] [--mmlu DIR] [--humaneval FILE] [--limit N] [--samples 1]
//!       [--temperature 0.8] [--max-tokens 512] [--batch-size N|auto] [--compare]
//!
//! On CUDA a step of many rows is the batched decode graph (`model/batch_graph.rs`); elsewhere the regular pass.

use anyhow::{bail, Context, Result};
use billion::bench::humaneval;
use billion::bench::mmlu::{self, BatchSize};
use billion::generation::batch::{generate_batch, BatchParams, BatchRequest};
use billion::generation::sampling::SamplingParams;
use billion::load::device::{device_name, dtype_name};
use billion::load::{load, LoadOptions, LoadedModel};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// What to time besides the decode table.
#[derive(Default)]
struct Evals {
    mmlu: Option<PathBuf>,
    humaneval: Option<PathBuf>,
    limit: Option<usize>,
    samples: usize,
    temperature: f64,
    max_tokens: usize,
    batch: Option<BatchSize>,
    compare: bool,
    skip_decode: bool,
}

fn main() -> Result<()> {
    billion::ops::cpu::pool::settle_thread_count();
    let (mut model, mut rows, mut prompt, mut gen) = (None, vec![1, 8, 32, 64, 128], 128usize, 128usize);
    let mut opts = LoadOptions::default();
    let mut ev = Evals { samples: 1, max_tokens: 512, ..Default::default() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" | "-m" => model = Some(value()?),
            "--rows" => rows = value()?.split(',').map(|r| r.trim().parse()).collect::<Result<_, _>>()?,
            "-p" | "--prompt" => prompt = value()?.parse().context("-p")?,
            "-n" | "--gen" => gen = value()?.parse().context("-n")?,
            "--device" => opts.device = Some(value()?.parse().map_err(anyhow::Error::msg)?),
            "--dtype" => opts.dtype = Some(billion::load::parse_dtype(&value()?).map_err(anyhow::Error::msg)?),
            "--random-weights" => opts.random_weights = true,
            "--mmlu" => ev.mmlu = Some(value()?.into()),
            "--humaneval" => ev.humaneval = Some(value()?.into()),
            "--limit" => ev.limit = Some(value()?.parse().context("--limit")?),
            "--samples" => ev.samples = value()?.parse().context("--samples")?,
            "--temperature" => ev.temperature = value()?.parse().context("--temperature")?,
            "--max-tokens" => ev.max_tokens = value()?.parse().context("--max-tokens")?,
            "--batch-size" => ev.batch = Some(value()?.parse().map_err(anyhow::Error::msg)?),
            "--compare" => ev.compare = true,
            "--no-decode" => ev.skip_decode = true,
            "--bench" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    let Some(model) = model else { bail!("usage: cargo bench --bench batched -- --model M [--rows 1,8,32]") };
    if prompt == 0 || gen == 0 || rows.contains(&0) {
        bail!("-p, -n and every --rows value must be at least 1");
    }
    let loaded = load(&model, &opts)?;
    if !ev.skip_decode {
        decode_table(&loaded, &model, &rows, prompt, gen)?;
    }
    if ev.mmlu.is_some() || ev.humaneval.is_some() {
        evals(&loaded, &ev)?;
    }
    Ok(())
}

fn decode_table(loaded: &LoadedModel, model: &str, rows: &[usize], prompt: usize, gen: usize) -> Result<()> {
    let m = &loaded.model;
    let vocab = m.config().vocab_size as u32;
    println!("| model | device | dtype | rows | prompt | gen | prefill tok/s | decode tok/s |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for &r in rows {
        // Different prompts per row, all of length `prompt`.
        let prompts: Vec<Vec<u32>> =
            (0..r).map(|i| (0..prompt).map(|j| ((i * 31 + j * 7) as u32 % (vocab - 3)) + 3).collect()).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let run = |steps: usize| -> Result<(f64, f64)> {
            let mut cache = m.new_cache().with_capacity(prompt + steps + 1);
            let start = Instant::now();
            let mut logits = m.prefill_rows(&refs, &mut cache)?;
            let mut next = logits.argmax(1)?;
            next.to_vec1::<u32>()?;
            let prefill = start.elapsed().as_secs_f64();
            let start = Instant::now();
            for _ in 0..steps {
                logits = m.forward_last(&next.reshape((r, 1))?, &mut cache)?;
                next = logits.argmax(1)?;
            }
            next.to_vec1::<u32>()?; // waits for the device
            Ok((prefill, start.elapsed().as_secs_f64()))
        };
        run(4.min(gen))?; // warm-up
        let (prefill, decode) = run(gen)?;
        println!(
            "| {model} | {} | {} | {r} | {prompt} | {gen} | {:.0} | {:.0} |",
            device_name(m.device()),
            dtype_name(m.dtype()),
            (r * prompt) as f64 / prefill,
            (r * gen) as f64 / decode
        );
    }
    Ok(())
}

/// Wall time of the batched MMLU and HumanEval generation (and of one row at a time with `--compare`).
fn evals(loaded: &LoadedModel, ev: &Evals) -> Result<()> {
    let batch = ev.batch.unwrap_or(BatchSize::Auto);
    let runs: Vec<BatchSize> = if ev.compare { vec![batch, BatchSize::Rows(1)] } else { vec![batch] };
    println!("\n| task | batch | items | seconds | items/s | tokens/s |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    if let Some(dir) = &ev.mmlu {
        let subjects = mmlu::load_dir(dir, None)?;
        let groups = mmlu::subject_groups();
        let never = AtomicBool::new(false);
        for &b in &runs {
            let start = Instant::now();
            let run = mmlu::evaluate(loaded, &subjects, 5, ev.limit, &groups, true, b, &never, |_| {})?;
            let secs = start.elapsed().as_secs_f64();
            let questions: usize = run.results.iter().map(|r| r.questions).sum();
            println!(
                "| MMLU 5-shot | {b} (≤ {} rows) | {questions} | {secs:.2} | {:.1} | {:.0} |",
                run.batch_rows,
                questions as f64 / secs,
                run.tokens_run as f64 / secs
            );
        }
    }
    if let Some(file) = &ev.humaneval {
        let mut problems = humaneval::load_file(file)?;
        if let Some(n) = ev.limit {
            problems.truncate(n);
        }
        let tok = loaded.tokenizer()?;
        let mut requests = vec![];
        for (pi, p) in problems.iter().enumerate() {
            let prompt = tok.encode(&p.prompt, true)?;
            for s in 0..ev.samples {
                let sampling = SamplingParams {
                    temperature: ev.temperature,
                    top_p: (ev.temperature > 0.0).then_some(0.95),
                    seed: (pi * 1000 + s) as u64,
                    ..Default::default()
                };
                let stop_strings = humaneval::STOP_SEQUENCES.iter().map(|s| s.to_string()).collect();
                requests.push(BatchRequest {
                    prompt: prompt.clone(),
                    max_tokens: ev.max_tokens,
                    stop_strings,
                    sampling,
                });
            }
        }
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0) + ev.max_tokens;
        for &b in &runs {
            let rows = match b {
                BatchSize::Rows(n) => n,
                BatchSize::Auto => billion::bench::run::generation_rows(loaded, longest),
            };
            let params = BatchParams { batch: rows, eos_ids: loaded.eos_ids(), interrupt: None };
            let stats = generate_batch(&loaded.model, Some(tok), &requests, &params, |_, _| Ok(()))?;
            println!(
                "| HumanEval generation ({} × {}) | {rows} rows | {} | {:.2} | {:.1} | {:.0} |",
                problems.len(),
                ev.samples,
                requests.len(),
                stats.seconds,
                requests.len() as f64 / stats.seconds,
                stats.tok_s()
            );
        }
    }
    Ok(())
}

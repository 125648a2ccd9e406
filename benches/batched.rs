//! Batched decode throughput, as llama.cpp's `llama-batched-bench` reports it: R sequences of P prompt tokens
//! prefilled together, then N decode steps of all R rows; tokens/s = R·N / decode time.
//!
//!   cargo bench --bench batched -- --model M [--rows 1,8,32,64,128] [-p 128] [-n 128] [--device cuda]
//!       [--dtype bf16] [--random-weights]
//!
//! Rows run through the regular forward pass (candle ops; the CUDA decode graph is batch 1 only).

use anyhow::{bail, Context, Result};
use billion::load::device::{device_name, dtype_name};
use billion::load::{load, LoadOptions};
use std::time::Instant;

fn main() -> Result<()> {
    let (mut model, mut rows, mut prompt, mut gen) = (None, vec![1, 8, 32, 64, 128], 128usize, 128usize);
    let mut opts = LoadOptions::default();
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
            "--bench" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    let Some(model) = model else { bail!("usage: cargo bench --bench batched -- --model M [--rows 1,8,32]") };
    if prompt == 0 || gen == 0 || rows.contains(&0) {
        bail!("-p, -n and every --rows value must be at least 1");
    }
    let loaded = load(&model, &opts)?;
    let m = &loaded.model;
    let vocab = m.config().vocab_size as u32;
    println!("| model | device | dtype | rows | prompt | gen | prefill tok/s | decode tok/s |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for &r in &rows {
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

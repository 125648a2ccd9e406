//! Prefill / decode speed in llama-bench's terms (pp512 / tg128, mean ± sd over -r runs after a warm-up).
//!
//!   cargo bench --bench speed -- --model M [--model M2 ...] [-p 512] [-n 128] [-r 5] [--quantize q8_0]
//!       [--device cpu|cuda] [--dtype bf16] [--random-weights] [--json]
//!
//! Threads: candle's CPU backend uses one thread per core; set RAYON_NUM_THREADS to pin it.

use anyhow::{bail, Context, Result};
use billion::bench::speed::measure;
use billion::load::device::{device_name, dtype_name};
use billion::load::{load, LoadOptions};
use billion::model::quant::Quantize;

struct Args {
    models: Vec<String>,
    prompt: usize,
    gen: usize,
    reps: usize,
    quantize: Vec<Option<Quantize>>,
    opts: LoadOptions,
    json: bool,
    /// Also time verifying k+1 tokens against one decode step (speculative decoding's target cost).
    verify: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        models: vec![],
        prompt: 512,
        gen: 128,
        reps: 5,
        quantize: vec![None],
        opts: LoadOptions::default(),
        json: false,
        verify: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" | "-m" => a.models.push(value()?),
            "-p" | "--prompt" => a.prompt = value()?.parse().context("-p")?,
            "-n" | "--gen" => a.gen = value()?.parse().context("-n")?,
            "-r" | "--reps" => a.reps = value()?.parse().context("-r")?,
            "--quantize" => a.quantize = value()?.split(',').map(Quantize::parse).collect::<Result<_>>()?,
            "--device" => a.opts.device = Some(value()?.parse().map_err(anyhow::Error::msg)?),
            "--dtype" => a.opts.dtype = Some(billion::load::parse_dtype(&value()?).map_err(anyhow::Error::msg)?),
            "--random-weights" => a.opts.random_weights = true,
            "--json" => a.json = true,
            "--verify" => a.verify = true,
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown flag {other}"),
        }
    }
    if a.models.is_empty() {
        bail!("usage: cargo bench --bench speed -- --model M [-p 512] [-n 128] [-r 5] [--quantize q8_0,...]");
    }
    Ok(a)
}

fn main() -> Result<()> {
    billion::ops::cpu::pool::settle_thread_count();
    let args = parse()?;
    if !args.json {
        println!(
            "| model | weights | device | dtype | pp{} tok/s | tg{} tok/s | load s | peak RSS |",
            args.prompt, args.gen
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    }
    for model in &args.models {
        for q in &args.quantize {
            let opts = LoadOptions { quantize: *q, ..args.opts.clone() };
            let loaded = load(model, &opts)?;
            let r = measure(&loaded.model, args.prompt, args.gen, args.reps)?;
            if args.verify {
                let one = billion::bench::speed::time_verify(&loaded.model, 128, 1, args.reps)?;
                let mut line = format!("verify cost at context 128 ({model}): 1 token {:.2} ms", one * 1e3);
                for k in [1, 2, 3, 4, 5, 6, 8] {
                    let t = billion::bench::speed::time_verify(&loaded.model, 128, k + 1, args.reps)?;
                    line.push_str(&format!("; k={k}: {:.2} ms ({:.2}x)", t * 1e3, t / one));
                }
                eprintln!("{line}");
            }
            let rss = billion::util::peak_rss_bytes().map(billion::util::human_bytes).unwrap_or_default();
            if args.json {
                let v = serde_json::json!({"model": model, "weights": loaded.quantization, "device": device_name(loaded.model.device()),
                    "dtype": dtype_name(loaded.model.dtype()), "load_s": loaded.load_seconds, "speed": r, "peak_rss": rss});
                println!("{v}");
            } else {
                let fmt = |t: &Option<billion::bench::speed::Throughput>| {
                    t.as_ref().map(|t| format!("{:.1} ± {:.1}", t.mean_tok_s, t.sd_tok_s)).unwrap_or_else(|| "-".into())
                };
                println!(
                    "| {} | {} | {} | {} | {} | {} | {:.2} | {} |",
                    model,
                    loaded.quantization,
                    device_name(loaded.model.device()),
                    dtype_name(loaded.model.dtype()),
                    fmt(&r.prefill),
                    fmt(&r.decode),
                    loaded.load_seconds,
                    rss
                );
            }
        }
    }
    Ok(())
}

//! Our CPU matrix kernels alone, on SmolLM2-135M's and TinyLlama's matrix shapes: decode (one row: GB/s of
//! weights streamed) and prefill (512 rows: GOP/s, two per multiply-add) through the 8-bit-activation
//! kernels; the f32 products over weights dequantized tile by tile (`ops::cpu::gemm`: `x·Wᵀ` and the
//! training backward's `dy·W`); and, beside them, what those replaced: the whole matrix dequantized, then
//! candle's f32 GEMM.
//!
//!   cargo bench --bench cpu_kernels -- [q4_1,q8_0,f16,...] [--tokens 512]
//!   cargo bench --bench cpu_kernels -- --memory     (the machine's read rate: what decode can stream at most)
//!
//! Threads: `BILLION_THREADS` (default one per core). Kernels: `BILLION_CPU_KERNELS=portable` forces the
//! portable ones, `avx2` the AVX2 ones on a CPU with VNNI / AVX-512 (for a side-by-side run).

use billion::ops::cpu::{self, WeightKind};
use candle_core::quantized::{GgmlDType, QTensor};
use std::time::Instant;

fn kind_of(name: &str) -> Option<(WeightKind, GgmlDType)> {
    Some(match name {
        "q4_0" => (WeightKind::Q4_0, GgmlDType::Q4_0),
        "q4_1" => (WeightKind::Q4_1, GgmlDType::Q4_1),
        "q5_0" => (WeightKind::Q5_0, GgmlDType::Q5_0),
        "q5_1" => (WeightKind::Q5_1, GgmlDType::Q5_1),
        "q8_0" => (WeightKind::Q8_0, GgmlDType::Q8_0),
        "q4k" => (WeightKind::Q4K, GgmlDType::Q4K),
        "q5k" => (WeightKind::Q5K, GgmlDType::Q5K),
        "q6k" => (WeightKind::Q6K, GgmlDType::Q6K),
        "f16" => (WeightKind::F16, GgmlDType::F16),
        "bf16" => (WeightKind::BF16, GgmlDType::BF16),
        _ => return None,
    })
}

fn main() -> anyhow::Result<()> {
    billion::ops::cpu::pool::settle_thread_count();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut tokens = 512;
    let mut names = vec!["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4k", "q5k", "q6k", "f16", "bf16"];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--memory" {
            return memory_read_rate();
        } else if a == "--tokens" {
            tokens = it.next().map(|v| v.parse()).transpose()?.unwrap_or(512);
        } else {
            names = a.split(',').collect::<Vec<_>>().leak().to_vec();
        }
    }
    println!("kernels: {}, threads: {}", cpu::isa(), cpu::pool::pool().threads());
    println!(
        "| type | rows × cols | decode µs | decode GB/s | prefill {tokens} ms | prefill GOP/s | f32 x·Wᵀ GFLOP/s | \
         f32 dy·W GFLOP/s | dequantize + candle x·Wᵀ GFLOP/s |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let shapes = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (5632, 2048), (2048, 5632)];
    for name in names {
        let (kind, g) = kind_of(name).ok_or_else(|| anyhow::anyhow!("unknown type {name}"))?;
        // SmolLM2's 576-wide rows do not divide into the K-quants' 256-element blocks (its files store those
        // matrices in a 32-wide type).
        for (rows, cols) in shapes.into_iter().filter(|&(_, cols)| cpu::supports(kind, cols)) {
            let w_dense = candle_core::Tensor::randn(0f32, 1.0, (rows, cols), &candle_core::Device::Cpu)?;
            let bytes = QTensor::quantize(&w_dense, g)?.data()?.to_vec();
            let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let mut y = vec![0f32; tokens * rows];
            // Decode: a few hundred products, weights cycling through more memory than the caches hold when
            // large (the 2048-wide ones), as in a forward pass.
            let reps = (200_000_000 / bytes.len()).clamp(20, 2000);
            // The layout the model loads: 8-row groups for the 32-wide types, rows for the others.
            let packed = cpu::PackedMatrix::packs(kind).then(|| cpu::PackedMatrix::pack(kind, &bytes, rows, cols));
            let product = |x: &[f32], n: usize, y: &mut [f32]| match &packed {
                Some(p) => cpu::matmul_packed(p, x, n, y),
                None => cpu::matmul(kind, &bytes, rows, cols, x, n, y),
            };
            product(&x[..cols], 1, &mut y[..rows]);
            let t = Instant::now();
            for _ in 0..reps {
                product(&x[..cols], 1, &mut y[..rows]);
            }
            let decode = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            let preps = 3;
            for _ in 0..preps {
                product(&x, tokens, &mut y);
            }
            let prefill = t.elapsed().as_secs_f64() / preps as f64;
            let weights = match &packed {
                Some(p) => cpu::gemm::Weights::Packed(p),
                None => cpu::gemm::Weights::Rows { kind, bytes: &bytes, rows, cols },
            };
            let flops = 2.0 * (rows * cols * tokens) as f64;
            let timed = |f: &mut dyn FnMut()| {
                f();
                let t = Instant::now();
                for _ in 0..preps {
                    f();
                }
                flops / (t.elapsed().as_secs_f64() / preps as f64) / 1e9
            };
            let wt = timed(&mut || cpu::gemm::matmul_wt(weights, &x, tokens, &mut y));
            let dy: Vec<f32> = x.iter().cycle().take(tokens * rows).copied().collect();
            let mut dx = vec![0f32; tokens * cols];
            let w = timed(&mut || cpu::gemm::matmul_w(weights, &dy, tokens, &mut dx));
            let xt = candle_core::Tensor::from_slice(&x, (tokens, cols), &candle_core::Device::Cpu)?;
            let q = QTensor::quantize(&w_dense, g)?;
            let mut run_candle = || {
                let w = q.dequantize(&candle_core::Device::Cpu).expect("dequantize");
                xt.matmul(&w.t().expect("transpose")).expect("matmul");
            };
            let candle = timed(&mut run_candle);
            println!(
                "| {name} | {rows} × {cols} | {:.1} | {:.1} | {:.1} | {:.1} | {wt:.1} | {w:.1} | {candle:.1} |",
                decode * 1e6,
                bytes.len() as f64 / decode / 1e9,
                prefill * 1e3,
                flops / prefill / 1e9
            );
        }
    }
    Ok(())
}

/// The rate at which the kernel threads can read memory: each sums its share of a 1 GiB buffer (far larger than
/// the caches), best of 8 passes. A decode step streams its weights once, so this bounds tokens/s at
/// rate ÷ weight bytes.
fn memory_read_rate() -> anyhow::Result<()> {
    let pool = billion::ops::cpu::pool::pool();
    let threads = pool.threads();
    let words = (1usize << 30) / 8;
    let buffer: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let share = words.div_ceil(threads);
    let check = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0f64;
    for _ in 0..8 {
        let t = Instant::now();
        pool.run(threads, &|task| {
            let part = &buffer[(task * share).min(words)..((task + 1) * share).min(words)];
            // Eight independent lanes: the compiler keeps them in vector registers.
            let mut acc = [0u64; 8];
            let mut i = 0;
            while i + 8 <= part.len() {
                for k in 0..8 {
                    acc[k] = acc[k].wrapping_add(part[i + k]);
                }
                i += 8;
            }
            let sum = acc.iter().fold(0u64, |x, y| x.wrapping_add(*y));
            check.fetch_add(sum, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let check = check.into_inner();
    println!("memory read rate, {threads} threads over 1 GiB: {best:.1} GB/s (checksum {check:x})");
    Ok(())
}

//! Write a Hugging Face style folder, or a llama GGUF file, with seeded random weights for a config.json:
//!   cargo run --release --example write_random_model -- CONFIG.json OUT_DIR [SEED]
//!   cargo run --release --example write_random_model -- CONFIG.json OUT.gguf [SEED] [f32|f16|q8_0|q4k|q6k|q4k_m]
//! (q4k_m mixes types like llama.cpp's Q4_K_M: Q6_K for v_proj, down_proj and the output head, Q4_K elsewhere)
//! Useful for load-time and memory measurements on real shapes without downloads, and for comparing
//! devices on identical weights.

use candle_core::quantized::GgmlDType;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: write_random_model CONFIG.json OUT_DIR|OUT.gguf [SEED] [GGUF TYPE]");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[1])?)?;
    let seed = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let out = std::path::Path::new(&args[2]);
    if out.extension().is_some_and(|e| e == "gguf") {
        let kind = args.get(4).map(String::as_str).unwrap_or("f32");
        let dtype = match kind {
            "f32" => GgmlDType::F32,
            "f16" => GgmlDType::F16,
            "q8_0" => GgmlDType::Q8_0,
            "q4k" | "q4k_m" => GgmlDType::Q4K,
            "q6k" => GgmlDType::Q6K,
            other => anyhow::bail!("unknown GGUF type `{other}` (expected f32, f16, q8_0, q4k, q6k or q4k_m)"),
        };
        let mixed = kind == "q4k_m";
        billion::testing::write_llama_gguf_with(out, &config, seed, |name| {
            let six = ["v_proj", "down_proj", "lm_head"].iter().any(|n| name.contains(n));
            if mixed && six {
                GgmlDType::Q6K
            } else {
                dtype
            }
        })?;
        println!("wrote {} ({kind})", out.display());
    } else {
        let cfg = billion::testing::write_hf_model(out, &config, seed)?;
        println!("wrote {} ({} parameters)", out.display(), cfg.parameter_count());
    }
    Ok(())
}

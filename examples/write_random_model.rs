//! Write a Hugging Face style folder with seeded random weights for a config.json:
//!   cargo run --release --example write_random_model -- CONFIG.json OUT_DIR [SEED]
//! Useful for load-time and memory measurements on real shapes without downloads.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: write_random_model CONFIG.json OUT_DIR [SEED]");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[1])?)?;
    let seed = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let cfg = billion::testing::write_hf_model(std::path::Path::new(&args[2]), &config, seed)?;
    println!("wrote {} ({} parameters)", args[2], cfg.parameter_count());
    Ok(())
}

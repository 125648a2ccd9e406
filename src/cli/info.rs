//! `billion info`: what a model is and what it will need, without loading its weights.

use super::LoadArgs;
use crate::util::human_bytes;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: LoadArgs,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InfoArgs) -> Result<()> {
    if let Some(d) = &a.model.adapter {
        anyhow::bail!(
            "--adapter {}: info describes the base model; use generate or chat to run with an adapter",
            d.display()
        );
    }
    let info = crate::load::info::inspect(&a.model.model, &a.model.options()).map_err(super::args::with_load_flag)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let params = info.parameters as f64;
    println!("model          {}", info.source);
    println!("format         {}", info.format);
    println!("architecture   {}", info.architecture);
    println!("parameters     {} ({:.3} B)", info.parameters, params / 1e9);
    println!("weights        {} (compute dtype {})", info.weights_dtype, info.compute_dtype);
    println!(
        "layers         {} (hidden {}, heads {}, kv heads {}, head dim {})",
        info.layers, info.hidden_size, info.heads, info.kv_heads, info.head_dim
    );
    println!("vocabulary     {}", info.vocab_size);
    println!("context        {} tokens", info.context_length);
    println!("memory         weights {}", human_bytes(info.weights_bytes));
    if info.kept_dense_weights > 0 {
        println!(
            "               ({} weights stay dense: their width is not a multiple of the quantization block)",
            info.kept_dense_weights
        );
    }
    println!(
        "               KV cache {} per token, {} at full context",
        human_bytes(info.kv_cache_bytes_per_token),
        human_bytes(info.kv_cache_bytes_per_token * info.context_length as u64)
    );
    println!("               total at full context {}", human_bytes(info.total_bytes_full_context));
    Ok(())
}

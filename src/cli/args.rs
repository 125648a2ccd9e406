//! Flags shared by every subcommand that loads a model or samples tokens: the same names, types, defaults and
//! validation everywhere. Values are parsed into types by clap (device, dtype, quantization), so a bad value
//! is refused before any work starts, with the flag named.

use crate::generation::sampling::SamplingParams;
use crate::load::{parse_dtype, DeviceSpec, LoadInput, LoadOptions, LoadedModel};
use crate::model::quant::{Quantize, QuantizeChoice};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;

/// Where and in what precision to run.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal (default: CUDA, then Metal, then CPU)
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    /// Compute dtype: f32, f16 or bf16 (default: bf16 on CUDA, f16 on Metal, f32 on CPU)
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    pub dtype: Option<DType>,
}

/// Data-parallel runs: one worker per GPU of this host, or one process per rank as torchrun starts them.
#[derive(Args, Debug, Clone)]
pub struct DistArgs {
    /// Data-parallel over GPUs of this host, one worker and model replica each: cuda:0,cuda:1 or all. For
    /// several hosts start the command once per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    /// MASTER_PORT set (as torchrun does) instead
    #[arg(long, value_name = "LIST")]
    pub devices: Option<crate::dist::DeviceList>,
    /// Seconds a rank waits for the others (to join, and at each exchange) before it stops with an error
    #[arg(long, value_name = "SECONDS", default_value_t = 1800.0)]
    pub dist_timeout: f64,
}

impl DistArgs {
    /// How this run's ranks start, with `--device` as given.
    pub fn launch(&self, device: Option<DeviceSpec>) -> Result<crate::dist::Launch> {
        if !(self.dist_timeout.is_finite() && self.dist_timeout > 0.0) {
            bail!("--dist-timeout must be a number of seconds > 0, got {}", self.dist_timeout);
        }
        let timeout = std::time::Duration::from_secs_f64(self.dist_timeout);
        crate::dist::Launch::resolve(self.devices.as_ref(), device, timeout)
    }
}

/// How to load one model; flattened into every subcommand that takes `--model`.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// A Hugging Face model folder, a .gguf file, a config.json (with --random-weights), or a hub name
    /// (alias such as tinyllama, or org/name), resolved from the HF cache and downloaded if missing
    #[arg(long, short = 'm')]
    pub model: String,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Quantize safetensors weights at load: none, q8_0, q4_0 or q4k
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<QuantizeChoice>,
    /// Use random weights of the config's exact shapes (no weight files needed)
    #[arg(long)]
    pub random_weights: bool,
    /// GGUF: expand quantized tensors to dense weights of the compute dtype
    #[arg(long)]
    pub dequantize: bool,
    /// Apply a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) unmerged
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device.device,
            dtype: self.device.dtype,
            quantize: self.quantize.and_then(|q| q.0),
            random_weights: self.random_weights,
            dequantize: self.dequantize,
        }
    }

    /// Load the model, with `--adapter` attached when given. Errors name the flag at fault.
    pub fn load(&self) -> Result<LoadedModel> {
        let mut loaded = load_flagged(&self.model, &self.options())?;
        if let Some(dir) = &self.adapter {
            let cfg = loaded.config().clone();
            let lora = crate::model::adapter::Lora::load_for(dir, &cfg, loaded.model.device())
                .with_context(|| format!("--adapter {}", dir.display()))?;
            let dtype = loaded.model.dtype();
            lora.attach_frozen(&mut loaded.model, dtype).with_context(|| format!("--adapter {}", dir.display()))?;
        }
        Ok(loaded)
    }
}

/// Load with errors that name the flag behind them (`--model`, `--quantize`, `--dequantize`, `--device`).
pub fn load_flagged(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    crate::load::load(model, opts).map_err(with_load_flag)
}

/// Put the flag a load (or `info`) error is about in front of it.
pub fn with_load_flag(e: anyhow::Error) -> anyhow::Error {
    let flag = match e.downcast_ref::<crate::load::LoadError>().map(|l| l.input) {
        Some(LoadInput::Device) => "--device",
        Some(LoadInput::Quantize) => "--quantize",
        Some(LoadInput::Dequantize) => "--dequantize",
        Some(LoadInput::Model) | None => "--model",
    };
    e.context(flag)
}

/// How tokens are chosen; flattened into every subcommand that samples. Greedy unless a temperature is given.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P, in (0, 1]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Penalty for tokens seen in the last 64 positions, > 0 (1.0 = off)
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Random seed for sampling (the same seed gives the same text)
    #[arg(long, default_value_t = 299792458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The validated sampling parameters.
    pub fn params(&self) -> Result<SamplingParams> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature must be a finite number ≥ 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be at least 1");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            bail!("--repeat-penalty must be a finite number > 0, got {}", self.repeat_penalty);
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        })
    }
}

/// A count that must be at least 1 (clap's parser for such flags).
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// A list of `--quantize` values (bench compares several).
pub fn quantize_list(values: &[QuantizeChoice]) -> Vec<Option<Quantize>> {
    values.iter().map(|q| q.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        s: SamplingArgs,
        #[command(flatten)]
        d: DeviceArgs,
    }

    #[test]
    fn sampling_values_are_validated() {
        let p = |args: &[&str]| T::try_parse_from([&["t"], args].concat()).map_err(|e| e.to_string());
        assert!(p(&["--temperature", "-1"]).unwrap().s.params().unwrap_err().to_string().contains("--temperature"));
        assert!(p(&["--top-p", "2"]).unwrap().s.params().unwrap_err().to_string().contains("--top-p"));
        assert!(p(&["--repeat-penalty", "nan"]).unwrap().s.params().is_err());
        assert!(p(&["--repeat-penalty", "0"]).unwrap().s.params().is_err());
        assert!(p(&["--top-k", "0"]).unwrap().s.params().is_err());
        assert_eq!(p(&["--temperature", "0.5"]).unwrap().s.params().unwrap().temperature, 0.5);
        assert!(p(&["--device", "tpu"]).unwrap_err().contains("--device"));
        assert!(p(&["--dtype", "f8"]).unwrap_err().contains("--dtype"));
    }
}

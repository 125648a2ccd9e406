//! Command line: one thin file per subcommand; each parses its flags and calls into the library.

mod bench;
mod chat;
mod download;
mod finetune;
mod generate;
mod info;
mod speculative;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "billion", version, about = "Run, benchmark, chat with, fine-tune and speed up ~1B-parameter LLMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark models: MMLU, HumanEval, speed and memory into results/
    Bench(bench::BenchArgs),
    /// Chat with a model: streamed replies in its own chat template
    Chat(chat::ChatArgs),
    /// Download models or datasets from the Hugging Face Hub (verified, resumable)
    Download(download::DownloadArgs),
    /// Fine-tune a model with LoRA on instruction or chat data; saves a PEFT adapter (and a merged model)
    Finetune(finetune::FinetuneArgs),
    /// Generate text from a prompt, streaming it to stdout
    Generate(generate::GenerateArgs),
    /// Speculative decoding: a draft model proposes, the target verifies (lossless)
    Speculative(speculative::SpeculativeArgs),
    /// Describe a model: architecture, parameters, dtype, context, memory
    Info(info::InfoArgs),
}

/// How to load a model; shared by every subcommand that takes `--model`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder, a .gguf file, a config.json (with --random-weights), or a hub name
    /// (alias such as tinyllama, or org/name), resolved from the HF cache and downloaded if missing
    #[arg(long, short = 'm')]
    pub model: String,
    /// cpu, cuda, cuda:N or metal (default: CUDA, then Metal, then CPU)
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16 (default: bf16 on CUDA, f16 on Metal, f32 on CPU)
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize safetensors weights at load: none, q8_0, q4_0 or q4k
    #[arg(long)]
    pub quantize: Option<String>,
    /// Use random weights of the config's exact shapes (no weight files needed)
    #[arg(long)]
    pub random_weights: bool,
    /// GGUF: expand quantized tensors to dense weights of the compute dtype
    #[arg(long)]
    pub dequantize: bool,
    /// Apply a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) unmerged
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// Load the model, with `--adapter` attached when given.
    pub fn load(&self) -> anyhow::Result<crate::model::LoadedModel> {
        let mut loaded = crate::model::load(&self.model, &self.load_options()?)?;
        if let Some(dir) = &self.adapter {
            use anyhow::Context;
            let cfg = loaded.config().clone();
            let lora = crate::finetune::lora::Lora::load_for(dir, &cfg, loaded.model.device())
                .with_context(|| format!("--adapter {}", dir.display()))?;
            let dtype = loaded.model.dtype();
            lora.attach_frozen(&mut loaded.model, dtype).with_context(|| format!("--adapter {}", dir.display()))?;
        }
        Ok(loaded)
    }

    pub fn load_options(&self) -> anyhow::Result<crate::model::LoadOptions> {
        Ok(crate::model::LoadOptions {
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            quantize: crate::model::weights::Quantize::parse_opt(self.quantize.as_deref())?,
            random_weights: self.random_weights,
            dequantize: self.dequantize,
        })
    }
}

/// Run the CLI; returns the process exit code. Errors print as one line on stderr.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Download(a) => download::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Info(a) => info::run(a),
        Command::Speculative(a) => speculative::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            // One line: the first line of each cause (candle appends backtraces on further lines).
            let msg: Vec<String> =
                e.chain().map(|c| c.to_string().lines().next().unwrap_or("").trim().to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            1
        }
    }
}

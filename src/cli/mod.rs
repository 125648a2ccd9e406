//! Command line: one thin file per subcommand; each parses its flags and calls into the library. Flags shared
//! between subcommands (loading, sampling) are declared once in `args.rs`.

mod args;
mod bench;
mod chat;
mod download;
mod finetune;
mod generate;
mod info;
mod speculative;

pub use args::{DeviceArgs, DistArgs, LoadArgs, SamplingArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "billion", version, about = "Run, benchmark, chat with, fine-tune and speed up ~1B-parameter LLMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for matrix work (default: the physical cores; the same as RAYON_NUM_THREADS). Fewer than
    /// the cores keeps decode steady on a busy machine
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
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

/// A run stopped by Ctrl-C after keeping what it finished: said on one line, exit status 130 (as a shell
/// reports for an interrupted program).
#[derive(Debug)]
pub struct StoppedByUser(pub String);

impl std::fmt::Display for StoppedByUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoppedByUser {}

/// Run the CLI; returns the process exit code. Errors print as one line on stderr.
pub fn main() -> i32 {
    // A closed stdout (`billion … | head`) ends the program quietly instead of a panic.
    crate::util::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if let Some(n) = cli.threads {
        // Read by the thread pools when they start (first CPU matmul), before any thread of ours exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("BILLION_THREADS", n.to_string());
    }
    crate::ops::cpu::pool::settle_thread_count();
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
            if e.downcast_ref::<StoppedByUser>().is_some() {
                130
            } else {
                1
            }
        }
    }
}

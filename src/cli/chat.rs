//! `billion chat`: an interactive REPL (line editing, history, streamed replies, Ctrl-C stops a reply), one
//! turn with `--prompt`, or one turn per stdin line when stdin is not a terminal.

use super::{LoadArgs, SamplingArgs};
use crate::chat::{template::FALLBACK_DESCRIPTION, ChatSession};
use crate::generation::{GenerateParams, StopReason};
use anyhow::{Context, Result};
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: LoadArgs,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this one message and exit
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Most tokens per reply
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// One JSON object per turn on stdout instead of text
    #[arg(long)]
    pub json: bool,
    /// Print tokens and tokens/s after each reply
    #[arg(long)]
    pub verbose: bool,
    /// Re-read the whole history every turn instead of reusing the KV cache (for checks)
    #[arg(long, hide = true)]
    pub no_cache_reuse: bool,
}

fn print_stats(s: &crate::chat::TurnStats) {
    eprintln!(
        "[{} prompt tokens ({} reused), {} generated; prefill {:.1} tok/s, decode {:.1} tok/s, ttft {:.0} ms]",
        s.prompt_tokens, s.reused_tokens, s.tokens, s.prefill_tok_s, s.decode_tok_s, s.ttft_ms
    );
}

pub fn run(a: ChatArgs) -> Result<()> {
    let sampling = a.sampling.params()?;
    let loaded = a.model.load()?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let mut params = GenerateParams::new(a.max_tokens, sampling, vec![]);
    params.interrupt = Some(interrupt.clone());
    let mut session = ChatSession::new(&loaded, a.system.clone(), params)?;
    session.reuse_cache = !a.no_cache_reuse;
    if session.template.is_fallback() {
        eprintln!("note: {FALLBACK_DESCRIPTION}");
    }
    let mut turn_no = 0;
    let mut one_turn = |session: &mut ChatSession, text: &str, stream: bool| -> Result<()> {
        turn_no += 1;
        interrupt.store(false, Ordering::Relaxed);
        let stdout = std::io::stdout();
        let reply = session.turn(text, |t| {
            if stream {
                let mut o = stdout.lock();
                if o.write_all(t.as_bytes()).and_then(|_| o.flush()).is_err() {
                    // stdout was closed (`| head`): nobody reads the rest.
                    std::process::exit(crate::util::CLOSED_STDOUT_EXIT);
                }
            }
        })?;
        let stats = session.last.clone().unwrap_or_default();
        if stats.dropped_messages > 0 {
            eprintln!("note: dropped the {} oldest message(s) to fit the context window", stats.dropped_messages);
        }
        if a.json {
            let v = serde_json::json!({
                "turn": turn_no, "reply": reply, "tokens": stats.tokens, "prompt_tokens": stats.prompt_tokens,
                "decode_tok_s": stats.decode_tok_s, "reused_tokens": stats.reused_tokens,
            });
            println!("{v}");
        } else {
            println!();
        }
        if a.verbose {
            print_stats(&stats);
        }
        Ok(())
    };

    if let Some(p) = &a.prompt {
        return one_turn(&mut session, p, !a.json);
    }
    if !std::io::stdin().is_terminal() {
        // Each line is a turn; lines starting with `/` are the same commands as at the interactive prompt.
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(cmd) = line.strip_prefix('/') {
                match run_command(&mut session, cmd)? {
                    CommandOutcome::Exit => break,
                    CommandOutcome::Done => {}
                    CommandOutcome::Unknown(name) => eprintln!("unknown command /{name} (not sent to the model)"),
                }
                continue;
            }
            one_turn(&mut session, line, !a.json)?;
        }
        return Ok(());
    }

    // Interactive: Ctrl-C during a reply stops that reply; at the prompt the line editor sees it.
    let flag = interrupt.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("cannot install the Ctrl-C handler")?;
    let mut rl = rustyline::DefaultEditor::new().context("cannot start the line editor")?;
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    eprintln!("chatting with {} — /help for commands, Ctrl-D or /exit to leave", loaded.source.display());
    loop {
        let line = match rl.readline(">>> ") {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /exit to leave)");
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line.as_str());
        if let Some(cmd) = line.strip_prefix('/') {
            match run_command(&mut session, cmd)? {
                CommandOutcome::Exit => break,
                CommandOutcome::Done => {}
                CommandOutcome::Unknown(name) => {
                    if !name.is_empty() && name != "help" {
                        eprintln!("unknown command /{name}");
                    }
                    eprintln!("{HELP}");
                }
            }
            continue;
        }
        if let Err(e) = one_turn(&mut session, &line, true) {
            eprintln!("error: {e:#}");
        }
        if let Some(stats) = session.last.as_ref().filter(|s| s.stop_reason == Some(StopReason::Interrupted)) {
            eprintln!("(stopped after {} tokens)", stats.tokens);
        }
    }
    if let Some(h) = &history {
        let _ = std::fs::create_dir_all(h.parent().unwrap_or(std::path::Path::new(".")));
        let _ = rl.save_history(h);
    }
    Ok(())
}

const HELP: &str = "commands: /reset  /system TEXT  /save FILE  /load FILE  /stats  /help  /exit\n\
                    Ctrl-C stops a reply; Ctrl-D leaves";

enum CommandOutcome {
    Done,
    Exit,
    /// Not a command we know (or `/help`): the name given.
    Unknown(String),
}

/// Run one `/command` (the text after the slash), at the interactive prompt or from piped input.
fn run_command(session: &mut ChatSession, cmd: &str) -> Result<CommandOutcome> {
    let (name, arg) = cmd.split_once(' ').map(|(n, r)| (n, r.trim())).unwrap_or((cmd, ""));
    match name {
        "exit" | "quit" => return Ok(CommandOutcome::Exit),
        "reset" => {
            session.reset();
            eprintln!("(conversation cleared)");
        }
        "system" => {
            session.system = if arg.is_empty() { None } else { Some(arg.to_string()) };
            eprintln!("(system prompt {})", if arg.is_empty() { "removed" } else { "set" });
        }
        "save" if !arg.is_empty() => match crate::util::write_atomic(
            std::path::Path::new(arg),
            serde_json::to_string_pretty(&session.to_json())?.as_bytes(),
        ) {
            Ok(()) => eprintln!("(saved to {arg})"),
            Err(e) => eprintln!("error: /save {arg}: {e:#}"),
        },
        "load" if !arg.is_empty() => {
            let r = std::fs::read_to_string(arg)
                .map_err(anyhow::Error::from)
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(anyhow::Error::from))
                .and_then(|v| session.load_json(&v));
            match r {
                Ok(()) => eprintln!("(loaded {} messages from {arg})", session.messages.len()),
                Err(e) => eprintln!("error: /load {arg}: {e:#}"),
            }
        }
        "save" | "load" => eprintln!("/{name} needs a file name: /{name} FILE"),
        "stats" => match &session.last {
            Some(s) => print_stats(s),
            None => eprintln!("(no reply yet)"),
        },
        other => return Ok(CommandOutcome::Unknown(other.to_string())),
    }
    Ok(CommandOutcome::Done)
}

fn history_path() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(std::path::PathBuf::from(home).join(".cache").join("billion").join("chat_history.txt"))
}

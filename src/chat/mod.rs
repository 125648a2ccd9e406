//! A multi-turn chat over one model: the model's chat template, stop at every end-of-turn id, and the KV
//! cache kept between turns so each turn prefills only what the newly rendered prompt adds.

pub mod template;

use crate::generation::{generate, GenerateParams, StopReason};
use crate::load::LoadedModel;
use crate::model::KvCache;
use anyhow::{bail, Result};
use template::{ChatTemplate, Message};

/// Tokens that end an assistant turn in common templates, added to the model's EOS ids when present.
const END_OF_TURN_TOKENS: [&str; 5] = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"];

/// The ids that end an assistant reply: the model's EOS ids and any end-of-turn token its vocabulary has.
pub fn end_of_turn_ids(loaded: &LoadedModel) -> Vec<u32> {
    let mut eos = loaded.eos_ids();
    if let Some(tok) = &loaded.tokenizer {
        for t in END_OF_TURN_TOKENS {
            if let Some(id) = tok.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
    }
    eos
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TurnStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the previous turn.
    pub reused_tokens: usize,
    pub tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub ttft_ms: f64,
    /// Oldest messages dropped to fit the context window.
    pub dropped_messages: usize,
    pub stop_reason: Option<StopReason>,
}

pub struct ChatSession<'a> {
    loaded: &'a LoadedModel,
    pub template: ChatTemplate,
    pub system: Option<String>,
    pub messages: Vec<Message>,
    cache: KvCache,
    /// The tokens whose keys/values `cache` holds, in order.
    cached: Vec<u32>,
    /// Reuse the cache across turns (off only to check that reuse changes nothing).
    pub reuse_cache: bool,
    pub params: GenerateParams,
    pub template_vars: serde_json::Value,
    pub last: Option<TurnStats>,
}

impl<'a> ChatSession<'a> {
    pub fn new(loaded: &'a LoadedModel, system: Option<String>, mut params: GenerateParams) -> Result<Self> {
        let tok = loaded.tokenizer()?;
        let template = ChatTemplate::new(tok.chat_template.clone(), tok.bos_token.clone(), tok.eos_token.clone());
        params.eos_ids = end_of_turn_ids(loaded);
        if template.is_fallback() && !params.stop_strings.iter().any(|s| s == "\nUser:") {
            params.stop_strings.push("\nUser:".into());
        }
        Ok(Self {
            loaded,
            template,
            system,
            messages: vec![],
            cache: loaded.model.new_cache(),
            cached: vec![],
            reuse_cache: true,
            params,
            template_vars: serde_json::json!({}),
            last: None,
        })
    }

    /// Forget the conversation (the system prompt stays).
    pub fn reset(&mut self) {
        self.messages.clear();
    }

    fn all_messages(&self) -> Vec<Message> {
        let mut m = vec![];
        if let Some(s) = &self.system {
            m.push(Message::new("system", s));
        }
        m.extend(self.messages.iter().cloned());
        m
    }

    /// Render and tokenize the whole conversation as the prompt for the next assistant turn.
    pub fn prompt_tokens(&self) -> Result<Vec<u32>> {
        let text = self.template.render(&self.all_messages(), true, &self.template_vars)?;
        // As transformers does for chat: the template itself carries any BOS it wants.
        self.loaded.tokenizer()?.encode(&text, self.template.is_fallback())
    }

    /// One user turn: returns the reply text; `on_text` receives it as it streams.
    pub fn turn(&mut self, user: &str, on_text: impl FnMut(&str)) -> Result<String> {
        self.messages.push(Message::new("user", user));
        let ctx = self.cache.max_len();
        let budget = self.params.max_tokens.min(ctx / 2);
        let mut dropped = 0;
        let prompt = loop {
            let p = self.prompt_tokens()?;
            if p.len() + budget <= ctx {
                break p;
            }
            // Drop the oldest exchange, never the system prompt or the new message.
            if self.messages.len() <= 1 {
                self.messages.pop();
                bail!("the message is {} tokens, too long for the context window of {ctx}", p.len());
            }
            let n = if self.messages.len() >= 3 && self.messages[1].role == "assistant" { 2 } else { 1 };
            self.messages.drain(..n);
            dropped += n;
        };
        let mut keep =
            if self.reuse_cache { self.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count() } else { 0 };
        keep = keep.min(prompt.len() - 1); // always prefill at least one token to get logits
        self.cache.truncate(keep);
        self.cached.truncate(keep);
        let mut params = self.params.clone();
        params.max_tokens = budget;
        let tok = self.loaded.tokenizer()?;
        let gen = generate(&self.loaded.model, Some(tok), &prompt[keep..], &mut self.cache, &params, on_text)?;
        self.cached.extend_from_slice(&prompt[keep..]);
        self.cached.extend_from_slice(&gen.tokens);
        self.cached.truncate(self.cache.len());
        let reply = gen.text.trim().to_string();
        self.messages.push(Message::new("assistant", &reply));
        self.last = Some(TurnStats {
            prompt_tokens: prompt.len(),
            reused_tokens: keep,
            tokens: gen.tokens.len(),
            prefill_tok_s: gen.prefill_tok_s(prompt.len() - keep),
            decode_tok_s: gen.decode_tok_s(),
            ttft_ms: gen.ttft_seconds * 1000.0,
            dropped_messages: dropped,
            stop_reason: Some(gen.stop_reason),
        });
        Ok(reply)
    }

    /// The conversation as JSON (for /save).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"system": self.system, "messages": self.messages})
    }

    /// Replace the conversation from JSON written by `to_json` (for /load).
    pub fn load_json(&mut self, v: &serde_json::Value) -> Result<()> {
        let messages: Vec<Message> = serde_json::from_value(v.get("messages").cloned().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("not a saved conversation: {e}"))?;
        self.system = v.get("system").and_then(|s| s.as_str()).map(String::from);
        self.messages = messages;
        Ok(())
    }
}

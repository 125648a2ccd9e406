//! Chat templates: the model's own Jinja template rendered with minijinja the way transformers renders it
//! (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`, `strftime_now`, bos/eos tokens), or
//! a plain stated fallback for models without one (Pythia).

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The format used when a model has no chat template.
pub const FALLBACK_DESCRIPTION: &str =
    "no chat template in the model; using a plain format: \"System: …\\n\\nUser: …\\n\\nAssistant: …\"";

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn strftime_now(format: String) -> String {
    let mut t: libc::time_t = 0;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let mut buf = [0u8; 256];
    let Ok(fmt) = std::ffi::CString::new(format) else { return String::new() };
    // SAFETY: valid pointers to locals; strftime writes at most buf.len() bytes.
    let n = unsafe {
        libc::time(&mut t);
        libc::localtime_r(&t, &mut tm);
        libc::strftime(buf.as_mut_ptr() as *mut libc::c_char, buf.len(), fmt.as_ptr(), &tm)
    };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        Self { source, bos_token: bos_token.unwrap_or_default(), eos_token: eos_token.unwrap_or_default() }
    }

    pub fn is_fallback(&self) -> bool {
        self.source.is_none()
    }

    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// Render `messages`; `vars` are extra template variables (e.g. `date_string`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        vars: &serde_json::Value,
    ) -> Result<String> {
        let Some(src) = &self.source else { return Ok(fallback(messages, add_generation_prompt)) };
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("template syntax: {e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("the chat template raised: {msg}")))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", src).map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        let tmpl = env.get_template("chat").expect("added above");
        let mut ctx = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        if let (Some(obj), Some(extra)) = (ctx.as_object_mut(), vars.as_object()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        tmpl.render(minijinja::value::Serde(&ctx)).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            anyhow!("chat template: {msg}")
        })
    }
}

fn fallback(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        let role = match m.role.as_str() {
            "system" => "System",
            "assistant" => "Assistant",
            _ => "User",
        };
        out.push_str(&format!("{role}: {}\n\n", m.content.trim()));
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    out
}

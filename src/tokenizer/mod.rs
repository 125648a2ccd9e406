//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, or one built from GGUF
//! metadata (SentencePiece-style for `llama`, byte-level BPE for `gpt2`), so a GGUF file runs alone.

pub mod spm;
pub mod stream;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use serde_json::Value as Json;
use std::path::Path;

pub use stream::TokenStream;

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<spm::SpmTokenizer>),
}

pub struct Tokenizer {
    inner: Inner,
    /// Whether encoding with special tokens prepends BOS ourselves (tokenizer.json does it in its own
    /// post-processor, GGUF tokenizers rely on us).
    manual_bos: bool,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

/// What `tokenizer_config.json` / `generation_config.json` add to a tokenizer.json.
#[derive(Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn ids_of(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

impl SpecialTokens {
    /// Gather BOS/EOS and the chat template from a model folder's JSON files.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut s = SpecialTokens::default();
        if let Some(tc) = read_json(&dir.join("tokenizer_config.json"))? {
            s.bos_token = token_string(tc.get("bos_token"));
            s.eos_token = token_string(tc.get("eos_token"));
            s.chat_template = match tc.get("chat_template") {
                Some(Json::String(t)) => Some(t.clone()),
                // A list of named templates: take the default one.
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            s.chat_template =
                Some(std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?);
        }
        for file in ["generation_config.json", "config.json"] {
            if let Some(g) = read_json(&dir.join(file))? {
                if s.bos_id.is_none() {
                    s.bos_id = g.get("bos_token_id").and_then(|x| x.as_u64()).map(|x| x as u32);
                }
                for id in ids_of(g.get("eos_token_id")) {
                    if !s.eos_ids.contains(&id) {
                        s.eos_ids.push(id);
                    }
                }
            }
        }
        Ok(s)
    }
}

impl Tokenizer {
    /// `tokenizer.json` plus the special-token facts of its folder.
    pub fn from_hf_file(path: &Path, special: SpecialTokens) -> Result<Self> {
        let tok = crate::util::contain_panic(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let mut t = Tokenizer {
            inner: Inner::Hf(Box::new(tok)),
            manual_bos: false,
            bos_id: special.bos_id,
            eos_ids: special.eos_ids,
            bos_token: special.bos_token,
            eos_token: special.eos_token,
            chat_template: special.chat_template,
        };
        if let Some(b) = t.bos_token.clone() {
            t.bos_id = t.token_to_id(&b).or(t.bos_id);
        }
        if let Some(e) = t.eos_token.clone() {
            if let Some(id) = t.token_to_id(&e) {
                if !t.eos_ids.contains(&id) {
                    t.eos_ids.push(id);
                }
            }
        }
        if t.bos_token.is_none() {
            t.bos_token = t.bos_id.and_then(|id| t.id_to_token(id));
        }
        if t.eos_token.is_none() {
            t.eos_token = t.eos_ids.first().and_then(|&id| t.id_to_token(id));
        }
        // Parts of tokenizer.json (the post-processor's special tokens) are only checked when used: try them
        // now, so a broken file is refused when loaded rather than at the first prompt.
        t.encode("a", true).with_context(|| format!("{}: the tokenizer cannot encode", path.display()))?;
        Ok(t)
    }

    /// A tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(c: &gguf_file::Content, path: &Path) -> Result<Self> {
        use crate::formats::gguf::{meta_bool, meta_str, meta_u64};
        let model = meta_str(c, "tokenizer.ggml.model")
            .with_context(|| format!("{}: no tokenizer in GGUF metadata (`tokenizer.ggml.model`)", path.display()))?;
        let tokens = string_array(c, "tokenizer.ggml.tokens", path)?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![spm::TYPE_NORMAL; tokens.len()],
        };
        same_length(path, "tokenizer.ggml.token_type", types.len(), tokens.len())?;
        let bos_id = meta_u64(c, "tokenizer.ggml.bos_token_id").map(|x| x as u32);
        let mut eos_ids = vec![];
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = meta_u64(c, k).map(|x| x as u32) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let chat_template = meta_str(c, "tokenizer.chat_template").map(String::from);
        let (inner, default_bos) = match model {
            "llama" => {
                let scores: Vec<f32> = match c.metadata.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                same_length(path, "tokenizer.ggml.scores", scores.len(), tokens.len())?;
                let add_space = meta_bool(c, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let unk = meta_u64(c, "tokenizer.ggml.unknown_token_id").map(|x| x as u32);
                (Inner::Spm(Box::new(spm::SpmTokenizer::new(tokens.clone(), scores, types, add_space, unk))), true)
            }
            "gpt2" => {
                let merges = string_array(c, "tokenizer.ggml.merges", path)?;
                let pre = meta_str(c, "tokenizer.ggml.pre").unwrap_or("default");
                (Inner::Hf(Box::new(byte_level_bpe(&tokens, &merges, &types, pre)?)), false)
            }
            other => bail!("{}: unsupported GGUF tokenizer model `{other}` (supported: llama, gpt2)", path.display()),
        };
        let manual_bos = meta_bool(c, "tokenizer.ggml.add_bos_token").unwrap_or(default_bos);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Tokenizer {
            inner,
            manual_bos,
            bos_id,
            bos_token: name(bos_id),
            eos_token: name(eos_ids.first().copied()),
            eos_ids,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm(t) => t.vocab_size(),
        }
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(s),
            Inner::Spm(t) => t.token_to_id(s),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(t) => t.token(id).map(String::from),
        }
    }

    /// Encode text. With `add_special`, BOS is added the way the model's tokenizer does it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            // tokenizer.json files are only partly validated when loaded; a broken one panics here.
            Inner::Hf(t) => crate::util::contain_panic(|| t.encode(text, add_special && !self.manual_bos))
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .get_ids()
                .to_vec(),
            Inner::Spm(t) => t.encode(text),
        };
        if add_special && self.manual_bos {
            if let Some(b) = self.bos_id {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Decode ids to text, leaving out special tokens when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => crate::util::contain_panic(|| t.decode(ids, skip_special))
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .map_err(|e| anyhow!("tokenizer: {e}")),
            Inner::Spm(t) => Ok(t.decode(ids, skip_special)),
        }
    }

    /// True for ids that stand for control tokens (BOS, EOS, chat markers).
    pub fn is_special(&self, id: u32) -> bool {
        match &self.inner {
            Inner::Hf(t) => t.get_added_vocabulary().get_added_tokens_decoder().get(&id).is_some_and(|a| a.special),
            Inner::Spm(t) => t.is_control(id),
        }
    }
}

/// Per-token metadata arrays must have one entry per token.
fn same_length(path: &Path, key: &str, len: usize, tokens: usize) -> Result<()> {
    if len != tokens {
        bail!("{}: `{key}` has {len} entries but `tokenizer.ggml.tokens` has {tokens}", path.display());
    }
    Ok(())
}

fn string_array(c: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let v = c.metadata.get(key).with_context(|| format!("{}: GGUF metadata lacks `{key}`", path.display()))?;
    let arr = v.to_vec().map_err(|_| anyhow!("{}: `{key}` is not an array", path.display()))?;
    arr.iter()
        .map(|x| x.to_string().cloned().map_err(|_| anyhow!("{}: `{key}` holds a non-string", path.display())))
        .collect()
}

/// llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level_bpe(tokens: &[String], merges: &[String], types: &[i32], pre: &str) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| anyhow!("bad merge `{m}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    // Llama-3 style vocabularies take a whole pre-token that is itself in the vocabulary before merging.
    let llama3 = matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "dbrx");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3)
        .build()
        .map_err(|e| anyhow!("BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?
            .into())
    };
    let pre_tok: PreTokenizerWrapper = match pre {
        _ if llama3 => Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        _ => Sequence::new(vec![split(GPT2_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == spm::TYPE_CONTROL || **t == spm::TYPE_USER_DEFINED)
        .map(|(i, t)| AddedToken::from(tokens[i].clone(), *t == spm::TYPE_CONTROL))
        .collect();
    let (control, user): (Vec<_>, Vec<_>) = specials.into_iter().partition(|a| a.special);
    tok.add_special_tokens(control).map_err(|e| anyhow!("special tokens: {e}"))?;
    tok.add_tokens(user).map_err(|e| anyhow!("added tokens: {e}"))?;
    Ok(tok)
}

/// Load the tokenizer of a Hugging Face model folder, if it has one.
pub fn from_model_dir(dir: &Path) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Tokenizer::from_hf_file(&path, SpecialTokens::from_dir(dir)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_arrays_must_match_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tokens = Value::Array(["<unk>", "<s>", "a"].iter().map(|t| Value::String(t.to_string())).collect());
        // One type more than tokens: building the special-token list used to index past the tokens.
        let types = Value::Array(vec![Value::I32(2), Value::I32(3), Value::I32(1), Value::I32(3)]);
        let model = Value::String("llama".into());
        let md = [
            ("tokenizer.ggml.model", &model),
            ("tokenizer.ggml.tokens", &tokens),
            ("tokenizer.ggml.token_type", &types),
        ];
        crate::formats::gguf::write_gguf(&path, &md, &[]).unwrap();
        let c = crate::formats::gguf::read_content(&path).unwrap();
        let err = Tokenizer::from_gguf(&c, &path).err().unwrap().to_string();
        assert!(err.contains("has 4 entries") && err.contains("has 3"), "{err}");
    }
}

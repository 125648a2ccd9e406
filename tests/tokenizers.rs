//! Tokenizers against llama.cpp's test vectors (made with HF tokenizers): both from the vocab-only GGUFs and
//! from the matching tokenizer.json files.

mod common;

use billion::formats::gguf::read_content;
use billion::tokenizer::{SpecialTokens, Tokenizer};
use std::path::Path;

fn cases(vectors: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(vectors.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(vectors.join(format!("{name}.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len() - 1, ids.len(), "{name}: one .out line per case (the .inp ends with a separator)");
    texts.into_iter().zip(ids).map(|(t, i)| (t.to_string(), i)).collect()
}

fn check(tok: &Tokenizer, cases: &[(String, Vec<u32>)], what: &str) {
    let mut failures = vec![];
    for (text, want) in cases {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{what}: {} cases equal", cases.len());
}

fn gguf_tokenizer(vectors: &Path, name: &str) -> Tokenizer {
    let path = vectors.join(name);
    Tokenizer::from_gguf(&read_content(&path).unwrap(), &path).unwrap()
}

#[test]
fn llama_spm_from_gguf() {
    let Some(v) = common::shared("fixtures/tokenizers/llamacpp-vectors") else { return };
    let name = "ggml-vocab-llama-spm.gguf";
    check(&gguf_tokenizer(&v, name), &cases(&v, name), "llama-spm (GGUF)");
}

#[test]
fn llama_spm_from_tokenizer_json() {
    let Some(v) = common::shared("fixtures/tokenizers/llamacpp-vectors") else { return };
    let dir = common::shared("fixtures/tokenizers/tinyllama").unwrap();
    let tok = Tokenizer::from_hf_file(&dir.join("tokenizer.json"), SpecialTokens::from_dir(&dir).unwrap()).unwrap();
    check(&tok, &cases(&v, "ggml-vocab-llama-spm.gguf"), "llama-spm (tokenizer.json)");
}

#[test]
fn llama_bpe_from_gguf() {
    let Some(v) = common::shared("fixtures/tokenizers/llamacpp-vectors") else { return };
    let name = "ggml-vocab-llama-bpe.gguf";
    check(&gguf_tokenizer(&v, name), &cases(&v, name), "llama-bpe (GGUF)");
}

#[test]
fn llama_bpe_from_tokenizer_json() {
    let Some(v) = common::shared("fixtures/tokenizers/llamacpp-vectors") else { return };
    let dir = common::shared("fixtures/tokenizers/llama3").unwrap();
    let tok = Tokenizer::from_hf_file(&dir.join("tokenizer.json"), SpecialTokens::from_dir(&dir).unwrap()).unwrap();
    check(&tok, &cases(&v, "ggml-vocab-llama-bpe.gguf"), "llama-bpe (tokenizer.json)");
}

#[test]
fn bos_and_special_tokens() {
    let Some(dir) = common::shared("fixtures/tokenizers/tinyllama") else { return };
    let tok = Tokenizer::from_hf_file(&dir.join("tokenizer.json"), SpecialTokens::from_dir(&dir).unwrap()).unwrap();
    let ids = tok.encode("Hello world", true).unwrap();
    assert_eq!(ids[0], 1, "TinyLlama adds BOS");
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(tok.eos_ids, vec![2]);
    let v = common::shared("fixtures/tokenizers/llamacpp-vectors").unwrap();
    let g = gguf_tokenizer(&v, "ggml-vocab-llama-spm.gguf");
    assert_eq!(g.encode("Hello world", true).unwrap(), ids, "GGUF tokenizer adds the same BOS");
    assert_eq!(g.decode(&ids, true).unwrap(), "Hello world");
    let l3 = common::shared("fixtures/tokenizers/llama3").unwrap();
    let t3 = Tokenizer::from_hf_file(&l3.join("tokenizer.json"), SpecialTokens::from_dir(&l3).unwrap()).unwrap();
    let ids = t3.encode("<|start_header_id|>user<|end_header_id|>", false).unwrap();
    assert_eq!(ids[0], 128006);
    assert_eq!(ids[ids.len() - 1], 128007);
}

#[test]
fn streaming_never_splits_characters() {
    let Some(v) = common::shared("fixtures/tokenizers/llamacpp-vectors") else { return };
    for name in ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"] {
        let tok = gguf_tokenizer(&v, name);
        let text = "Führer 🦙 naïve 日本語 end";
        let ids = tok.encode(text, false).unwrap();
        let mut stream = billion::tokenizer::TokenStream::new(&tok);
        let mut out = String::new();
        for id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{name}: emitted a partial character in {piece:?}");
                out.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, text, "{name}");
    }
}

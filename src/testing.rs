//! Tiny random models of every architecture, written by our own code (safetensors folders and GGUF
//! files), for self-contained tests and examples. Weights are seeded, so a seed always gives the same model.

use crate::formats::gguf::write_gguf;
use crate::model::weights::{Init, Weights};
use crate::model::{Architecture, Model, ModelConfig};
use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// The first CUDA device, or `None` with a note on stderr that the calling GPU test is skipped (machines
/// without a GPU, and builds without the `cuda` feature, run the rest of the suite).
pub fn cuda_device() -> Option<Device> {
    let device = candle_core::utils::cuda_is_available().then(|| Device::new_cuda(0).ok()).flatten();
    if device.is_none() {
        eprintln!("skipping: no CUDA device");
    }
    device
}

/// Held by GPU tests that switch a kernel choice through the environment (read when an engine is built) and
/// by those whose checks need the default choice: tests run in parallel threads of one process.
static GPU_ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lock above, also after a test that held it failed.
pub fn gpu_env_lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// config.json for a tiny model of `arch` (hidden 64, 2 layers, 4 heads, vocab `vocab`).
pub fn tiny_config(arch: Architecture, vocab: usize) -> serde_json::Value {
    (arch.spec().tiny_config)(vocab)
}

/// Every tensor a Hugging Face checkpoint of this config holds, with its shape and kind: exactly what the
/// architecture asks for when it is built from random weights.
fn hf_tensors(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>, Init)>> {
    let w = Weights::random(cfg.architecture, DType::F32, &Device::Cpu);
    Model::build(cfg, &w)?;
    Ok(w.requested())
}

fn normal(rng: &mut StdRng, std: f32) -> f32 {
    // Box–Muller: enough for test weights without another dependency.
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random::<f32>();
    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A tensor of Normal(`mean`, `std`) values from a seeded generator (on the CPU), so that a failing test sees the
/// same input when it is run again.
pub fn seeded_randn(seed: u64, mean: f32, std: f32, shape: &[usize]) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| mean + normal(&mut rng, std)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches the data")
}

/// Random f32 tensors of every weight of `cfg`, seeded.
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = StdRng::seed_from_u64(seed);
    hf_tensors(cfg)?
        .into_iter()
        .map(|(name, shape, init)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| match init {
                    Init::Normal => normal(&mut rng, 0.1),
                    Init::Ones => 0.8 + 0.4 * rng.random::<f32>(),
                    Init::Zeros => normal(&mut rng, 0.05),
                })
                .collect();
            Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
        })
        .collect()
}

/// Write a Hugging Face style folder (config.json, model.safetensors f32, generation_config.json).
pub fn write_hf_model(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<ModelConfig> {
    std::fs::create_dir_all(dir)?;
    let cfg = ModelConfig::from_hf_json(config)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    let tensors: HashMap<String, Tensor> = random_tensors(&cfg, seed)?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let gen = serde_json::json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids});
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&gen)?)?;
    Ok(cfg)
}

/// llama.cpp's q/k row permutation: HF's half-split rotary layout → interleaved pairs.
fn permute_for_interleaved_rope(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// A tiny SentencePiece-style vocabulary: specials, the 256 byte tokens and a few pieces.
pub fn tiny_spm_vocab(size: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = ["▁", "e", "t", "a", "o", "h", "▁t", "he", "▁the", "▁a", "n", "s", "▁s", "in", "er", "▁w"];
    for p in pieces {
        if tokens.len() < size {
            tokens.push(p.to_string());
            types.push(1);
        }
    }
    while tokens.len() < size {
        tokens.push(format!("▁w{}", tokens.len()));
        types.push(1);
    }
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    (tokens, scores, types)
}

/// Write a llama GGUF of the same weights as `write_hf_model(config, seed)`, with linear weights stored as
/// `dtype` (Q8_0, Q4_0, F32 …) and a tiny SentencePiece vocabulary in the metadata.
pub fn write_llama_gguf(path: &Path, config: &serde_json::Value, seed: u64, dtype: GgmlDType) -> Result<()> {
    write_llama_gguf_with(path, config, seed, |_| dtype)
}

/// Like `write_llama_gguf`, with each matrix's type chosen by its Hugging Face tensor name (mixed files such
/// as llama.cpp's Q4_K_M).
pub fn write_llama_gguf_with(
    path: &Path,
    config: &serde_json::Value,
    seed: u64,
    dtype_of: impl Fn(&str) -> GgmlDType,
) -> Result<()> {
    let cfg = ModelConfig::from_hf_json(config)?;
    anyhow::ensure!(cfg.architecture == Architecture::Llama, "write_llama_gguf writes llama models");
    let arch = cfg.architecture;
    let mut qtensors: Vec<(String, QTensor)> = vec![];
    for (name, t) in random_tensors(&cfg, seed)? {
        let t = if name.ends_with("q_proj.weight") {
            permute_for_interleaved_rope(&t, cfg.num_heads)?
        } else if name.ends_with("k_proj.weight") {
            permute_for_interleaved_rope(&t, cfg.num_kv_heads)?
        } else {
            t
        };
        let is_matrix = t.rank() == 2;
        let dtype = dtype_of(&name);
        let q = if is_matrix && t.dim(1)? % dtype.block_size() == 0 {
            QTensor::quantize(&t, dtype)?
        } else {
            QTensor::quantize(&t, GgmlDType::F32)?
        };
        let gname = arch.gguf_name(&name).expect("llama names map to GGUF");
        qtensors.push((gname, q));
    }
    let (tokens, scores, types) = tiny_spm_vocab(cfg.vocab_size);
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("tiny-llama-test".into())),
        ("llama.context_length".into(), Value::U32(cfg.max_position_embeddings as u32)),
        ("llama.embedding_length".into(), Value::U32(cfg.hidden_size as u32)),
        ("llama.block_count".into(), Value::U32(cfg.num_layers as u32)),
        ("llama.feed_forward_length".into(), Value::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count".into(), Value::U32(cfg.num_heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(cfg.num_kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta as f32)),
        ("llama.rope.dimension_count".into(), Value::U32(cfg.rotary_dim as u32)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_gguf(path, &md_refs, &t_refs)
}

/// ChatML, the chat template the test tokenizer carries.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte → printable character table (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// Write a byte-level tokenizer (tokenizer.json: one token per byte, ids 0–255, no merges; `<|im_start|>` 256,
/// `<|im_end|>` 257, `<|endoftext|>` 258) and tokenizer_config.json with the ChatML template into `dir`.
/// Models using it need a vocabulary of at least 259 and eos 257.
pub fn write_test_tokenizer(dir: &Path) -> Result<()> {
    let vocab: serde_json::Map<String, serde_json::Value> =
        byte_chars().into_iter().enumerate().map(|(i, c)| (c.to_string(), serde_json::json!(i))).collect();
    let special = |id: u32, s: &str| {
        serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
        "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>"), special(258, "<|endoftext|>")],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let cfg = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": CHATML_TEMPLATE});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// A tiny llama folder (vocab 320, eos `<|im_end|>`) with the byte-level test tokenizer and ChatML.
pub fn write_chat_model(dir: &Path, seed: u64) -> Result<ModelConfig> {
    let mut config = tiny_config(Architecture::Llama, 320);
    config["eos_token_id"] = serde_json::json!(257);
    config["bos_token_id"] = serde_json::json!(258);
    let cfg = write_hf_model(dir, &config, seed)?;
    write_test_tokenizer(dir)?;
    Ok(cfg)
}

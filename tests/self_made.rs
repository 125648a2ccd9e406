//! Tiny random models written by our own code: cache decode equals a full forward, rollback works, GGUF
//! (F32 / Q8_0 / Q4_0) and load-time quantization agree with the dense safetensors model.

use billion::load::{load, LoadOptions, LoadedModel};
use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_hf_model, write_llama_gguf};
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

const ARCHS: [Architecture; 3] = [Architecture::Llama, Architecture::StableLm, Architecture::GptNeoX];
const PROMPT: [u32; 10] = [1, 17, 300, 42, 5, 99, 260, 7, 123, 64];

fn cpu() -> LoadOptions {
    LoadOptions {
        device: Some(billion::load::DeviceSpec::Cpu),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    }
}

fn load_path(p: &std::path::Path, opts: &LoadOptions) -> LoadedModel {
    load(p.to_str().unwrap(), opts).unwrap()
}

fn full_logits(m: &LoadedModel, ids: &[u32]) -> Tensor {
    let mut cache = m.model.new_cache();
    m.model.forward(&m.model.input(ids).unwrap(), &mut cache).unwrap().squeeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Root-mean-square error relative to the reference's root-mean-square.
fn rel_rms(got: &Tensor, want: &Tensor) -> f32 {
    rms(&(got - want).unwrap()) / rms(want)
}

fn rms(a: &Tensor) -> f32 {
    a.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn cached_decode_equals_full_forward_for_every_architecture() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), &tiny_config(arch, 320), 7).unwrap();
        let m = load_path(dir.path(), &cpu());
        let full = full_logits(&m, &PROMPT);
        // One token at a time.
        let mut cache = m.model.new_cache().with_capacity(2); // forces the cache to grow on the way
        let mut rows = vec![];
        for &id in &PROMPT {
            rows.push(m.model.forward(&m.model.input(&[id]).unwrap(), &mut cache).unwrap().squeeze(0).unwrap());
        }
        let stepwise = Tensor::cat(&rows, 0).unwrap();
        let d = max_diff(&full, &stepwise);
        assert!(d < 1e-4, "{arch:?}: token-by-token differs from full forward by {d}");
        // In two chunks.
        let mut cache = m.model.new_cache();
        let a = m.model.forward(&m.model.input(&PROMPT[..4]).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
        let b = m.model.forward(&m.model.input(&PROMPT[4..]).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
        let d = max_diff(&full, &Tensor::cat(&[a, b], 0).unwrap());
        assert!(d < 1e-4, "{arch:?}: chunked prefill differs by {d}");
    }
}

#[test]
fn rollback_restores_an_earlier_state() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), &tiny_config(arch, 320), 11).unwrap();
        let m = load_path(dir.path(), &cpu());
        let mut cache = m.model.new_cache();
        m.model.forward(&m.model.input(&PROMPT).unwrap(), &mut cache).unwrap();
        assert_eq!(cache.len(), PROMPT.len());
        // Roll back to 6 tokens and continue differently: must equal a fresh forward of that sequence.
        cache.truncate(6);
        assert_eq!(cache.len(), 6);
        let other = [200u32, 201, 202];
        let cont = m.model.forward(&m.model.input(&other).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
        let mut seq = PROMPT[..6].to_vec();
        seq.extend(other);
        let fresh = full_logits(&m, &seq).narrow(0, 6, 3).unwrap();
        let d = max_diff(&cont, &fresh);
        assert!(d < 1e-4, "{arch:?}: after rollback logits differ by {d}");
    }
}

#[test]
fn gguf_f32_equals_safetensors_and_quantized_is_close() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama, 320);
    write_hf_model(&dir.path().join("hf"), &cfg, 3).unwrap();
    let dense = full_logits(&load_path(&dir.path().join("hf"), &cpu()), &PROMPT);
    let scale = rms(&dense);
    for (dtype, tolerance) in [(GgmlDType::F32, 1e-5), (GgmlDType::Q8_0, 0.05), (GgmlDType::Q4_0, 0.5)] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_llama_gguf(&path, &cfg, 3, dtype).unwrap();
        let m = load_path(&path, &LoadOptions { device: Some(billion::load::DeviceSpec::Cpu), ..Default::default() });
        assert!(m.tokenizer.is_some(), "the GGUF's own tokenizer is loaded");
        let got = full_logits(&m, &PROMPT);
        let rel = rel_rms(&got, &dense);
        assert!(rel < tolerance, "{dtype:?}: relative RMS error {rel} (limit {tolerance})");
        eprintln!("{dtype:?}: relative RMS error of logits {rel:.4}");
        // Quantized models must still decode consistently through the cache.
        let mut cache = m.model.new_cache();
        let mut rows = vec![];
        for &id in &PROMPT {
            rows.push(m.model.forward(&m.model.input(&[id]).unwrap(), &mut cache).unwrap().squeeze(0).unwrap());
        }
        let d = max_diff(&got, &Tensor::cat(&rows, 0).unwrap()) / scale;
        assert!(d < 1e-3, "{dtype:?}: cached decode differs by {d}");
        // Against the same quantized weights expanded to f32: only the kernels' own rounding (activations
        // quantized to 8 bits) is left: measured 0.014–0.016, ten times below the weights' own error.
        let expanded = load_path(&path, &LoadOptions { dequantize: true, ..cpu() });
        let rel = rel_rms(&got, &full_logits(&expanded, &PROMPT));
        eprintln!("{dtype:?}: relative RMS error against its own weights in f32 {rel:.4}");
        assert!(rel < 0.05, "{dtype:?}: quantized kernels differ from the same weights in f32 by {rel}");
    }
}

/// A copy of the HF folder `src` whose linear weights went through `dtype` and back (the weights a
/// `--quantize` load computes with), in f32.
fn requantized_copy(src: &std::path::Path, dst: &std::path::Path, dtype: GgmlDType) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let out: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let linear = t.rank() == 2 && name != "model.embed_tokens.weight";
            let t = if linear {
                let q = candle_core::quantized::QTensor::quantize(&t, dtype).unwrap();
                q.dequantize(&candle_core::Device::Cpu).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&out, dst.join("model.safetensors")).unwrap();
}

#[test]
fn load_time_quantization_is_close_to_dense() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_model(dir.path(), &tiny_config(Architecture::Llama, 320), 5).unwrap();
    let dense = full_logits(&load_path(dir.path(), &cpu()), &PROMPT);
    // K-quants work on 256-wide blocks: a wider model for q4k.
    let wide = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Architecture::Llama, 320);
    cfg["hidden_size"] = 256.into();
    cfg["intermediate_size"] = 512.into();
    write_hf_model(wide.path(), &cfg, 5).unwrap();
    let wide_dense = full_logits(&load_path(wide.path(), &cpu()), &PROMPT);
    for (q, tolerance) in [("q8_0", 0.05), ("q4_0", 0.5), ("q4k", 0.5)] {
        let opts = LoadOptions { quantize: billion::model::quant::Quantize::parse(q).unwrap(), ..cpu() };
        let (dir, dense) = if q == "q4k" { (&wide, &wide_dense) } else { (&dir, &dense) };
        let m = load_path(dir.path(), &opts);
        let rel = rel_rms(&full_logits(&m, &PROMPT), dense);
        eprintln!("--quantize {q}: relative RMS error of logits {rel:.4}");
        assert!(m.kept_dense.is_empty(), "{q}: every linear layer is quantized");
        assert!(m.model.weight_bytes() < load_path(dir.path(), &cpu()).model.weight_bytes());
        assert!(rel < tolerance, "--quantize {q}: relative RMS error {rel} (limit {tolerance})");
        // The same rounded weights in f32: what is left is the quantized kernels' own error (measured
        // 0.021–0.036 where the whole error is 0.03–0.34).
        let ggml = billion::model::quant::Quantize::parse(q).unwrap().unwrap().ggml();
        let same = tempfile::tempdir().unwrap();
        requantized_copy(dir.path(), same.path(), ggml);
        let rel = rel_rms(&full_logits(&m, &PROMPT), &full_logits(&load_path(same.path(), &cpu()), &PROMPT));
        eprintln!("--quantize {q}: relative RMS error against its own weights in f32 {rel:.4}");
        assert!(rel < 0.05, "--quantize {q}: quantized kernels differ from the same weights in f32 by {rel}");
    }
}

#[test]
fn random_weights_from_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, tiny_config(Architecture::GptNeoX, 128).to_string()).unwrap();
    let m = load_path(&path, &LoadOptions { random_weights: true, ..cpu() });
    let l = full_logits(&m, &[1, 2, 3]);
    assert_eq!(l.dims(), &[3, 128]);
    assert_eq!(m.format, "random");
}

#[test]
fn differentiable_ops_match_fused_and_carry_gradients() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), &tiny_config(arch, 320), 21).unwrap();
        let mut m = load_path(dir.path(), &cpu());
        let fused = full_logits(&m, &PROMPT);
        m.model.set_ops(billion::model::Ops::Differentiable);
        let diff = full_logits(&m, &PROMPT);
        let d = max_diff(&fused, &diff);
        assert!(d < 1e-4, "{arch:?}: differentiable path differs by {d}");
        // A LoRA-style trainable delta on one projection receives a gradient through the whole network.
        let var = candle_core::Var::zeros((8, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let b = Tensor::ones(
            (m.model.linears_mut()[0].1.out_features(), 8),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let a = var.as_tensor().clone();
        let first = m.model.linears_mut().into_iter().next().unwrap().1;
        first.set_lora(Some(billion::model::linear::LoraAdapter { a, b, scale: 0.5, dropout: 0.0 }));
        let logits = full_logits(&m, &PROMPT);
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("gradient reaches the adapter");
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{arch:?}: non-zero gradient");
    }
}

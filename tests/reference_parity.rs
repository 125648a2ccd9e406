//! Our logits and greedy tokens against Hugging Face transformers' own, for every reference case.

mod common;

use billion::load::{load, LoadOptions};
use candle_core::{DType, Device, Tensor};

fn check_case(case: &str) {
    let Some(dir) = common::shared(&format!("fixtures/reference/{case}")) else { return };
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = reference["input_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let subset: Vec<u32> = reference["vocab_subset"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let want_subset = &reference["logits_subset"];
    let want_last: Vec<f32> = reference["last_logits"].to_vec1().unwrap();
    let want_greedy: Vec<u32> = reference["greedy_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();

    let opts = LoadOptions {
        device: Some(billion::load::DeviceSpec::Cpu),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    let loaded = load(dir.to_str().unwrap(), &opts).unwrap();
    let model = &loaded.model;
    let mut cache = model.new_cache();
    let logits = model.forward(&model.input(&ids).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
    let idx = Tensor::new(subset.as_slice(), &Device::Cpu).unwrap();
    let got_subset = logits.index_select(&idx, 1).unwrap();
    let diff = (got_subset - want_subset).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "{case}: logits subset differ by {diff}");
    let got_last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
    let diff_last = got_last.iter().zip(&want_last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff_last < 1e-4, "{case}: last logits differ by {diff_last}");

    // Greedy continuation through the KV cache, token by token.
    let mut next = billion::generation::sampling::argmax(&got_last);
    let mut greedy = vec![];
    for _ in 0..want_greedy.len() {
        greedy.push(next);
        let l = model.forward_last(&model.input(&[next]).unwrap(), &mut cache).unwrap();
        next = billion::generation::sampling::argmax(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    }
    assert_eq!(greedy, want_greedy, "{case}: greedy tokens differ");

    // The training path (differentiable ops; on the CPU the tiled attention where the head dim allows it).
    let mut loaded = loaded;
    loaded.model.set_ops(billion::model::Ops::Differentiable);
    let model = &loaded.model;
    let logits = model.forward(&model.input(&ids).unwrap(), &mut model.new_cache()).unwrap().squeeze(0).unwrap();
    let got = logits.to_dtype(DType::F32).unwrap().index_select(&idx, 1).unwrap();
    let diff_train = (got - want_subset).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff_train < 1e-4, "{case}: the training path's logits differ by {diff_train}");
    eprintln!(
        "{case}: max |Δlogit| {diff:.2e} (subset), {diff_last:.2e} (last), {diff_train:.2e} (training path); 16 \
         greedy tokens equal"
    );
}

#[test]
fn llama2_tiny_matches_transformers() {
    check_case("llama2-tiny");
}

#[test]
fn llama3_tiny_matches_transformers() {
    check_case("llama3-tiny");
}

#[test]
fn stablelm_tiny_matches_transformers() {
    check_case("stablelm-tiny");
}

#[test]
fn pythia_tiny_matches_transformers() {
    check_case("pythia-tiny");
}

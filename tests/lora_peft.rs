//! LoRA against PyTorch + peft: loss, every gradient, one AdamW step and the merged weights.

mod common;

use billion::finetune::loss::{causal_lm_loss, labelled_rows, selected_rows_loss};
use billion::finetune::optim::{AdamW, AdamWParams};
use billion::load::{load, LoadOptions};
use billion::model::adapter::Lora;
use billion::model::Ops;
use candle_core::{DType, Device, Tensor};

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let d = (got - want).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    let n = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    d / n.max(1e-12)
}

fn check(case: &str) {
    let (Some(base), Some(dir)) =
        (common::shared(&format!("fixtures/reference/{case}")), common::shared(&format!("fixtures/lora/{case}")))
    else {
        return;
    };
    let opts = LoadOptions {
        device: Some(billion::load::DeviceSpec::Cpu),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    let mut loaded = load(base.to_str().unwrap(), &opts).unwrap();
    let reference = candle_core::safetensors::load(dir.join("lora_reference.safetensors"), &Device::Cpu).unwrap();
    let lora = Lora::load(&dir, &Device::Cpu).unwrap();
    assert!(!lora.params.is_empty());
    lora.attach(&mut loaded.model).unwrap();
    loaded.model.set_ops(Ops::Differentiable);

    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let mut cache = loaded.model.new_cache();
    let logits = loaded.model.forward(&ids, &mut cache).unwrap();
    let loss = causal_lm_loss(&logits, &reference["labels"]).unwrap();
    let want_loss = reference["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(((got_loss - want_loss) / want_loss).abs() < 1e-5, "{case}: loss {got_loss} vs peft {want_loss}");

    let grads = loss.backward().unwrap();
    for (module, a, b) in &lora.params {
        for (which, var) in [("lora_A", a), ("lora_B", b)] {
            let want = &reference[&format!("grad.{module}.{which}.weight")];
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {module}.{which}"));
            let e = rel_err(got, want);
            assert!(e <= 1e-4, "{case}: gradient of {module}.{which} off by {e:.2e} (relative)");
        }
    }

    // The training loop's path: only the labelled positions through the head, the same loss and gradients.
    let (rows, targets) = labelled_rows(&reference["labels"], loaded.config().vocab_size).unwrap();
    let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let mut cache = loaded.model.new_cache();
    let selected = loaded.model.forward_rows(&ids, &mut cache, &rows).unwrap();
    let loss_rows = selected_rows_loss(&selected, &targets).unwrap();
    let got_rows = loss_rows.to_scalar::<f32>().unwrap();
    assert!(
        ((got_rows - want_loss) / want_loss).abs() < 1e-5,
        "{case}: selected-rows loss {got_rows} vs peft {want_loss}"
    );
    let grads_rows = loss_rows.backward().unwrap();
    for (module, a, b) in &lora.params {
        for (which, var) in [("lora_A", a), ("lora_B", b)] {
            let want = &reference[&format!("grad.{module}.{which}.weight")];
            let e = rel_err(grads_rows.get(var.as_tensor()).unwrap(), want);
            assert!(e <= 1e-4, "{case}: selected-rows gradient of {module}.{which} off by {e:.2e} (relative)");
        }
    }

    // The fused head + loss the training loop runs (`nll_rows`), and the same with activation checkpointing.
    let weight = 1.0 / targets.dim(0).unwrap() as f64;
    let mut cache = loaded.model.new_cache();
    let nll = loaded.model.nll_rows(&ids, &mut cache, &rows, &targets).unwrap();
    let fused = (nll.sum_all().unwrap() * weight).unwrap();
    let got_fused = fused.to_scalar::<f32>().unwrap();
    assert!(((got_fused - want_loss) / want_loss).abs() < 1e-5, "{case}: fused loss {got_fused} vs peft {want_loss}");
    let grads_fused = fused.backward().unwrap();
    let vars = lora.vars();
    let checkpointed = loaded.model.checkpointed_gradients(&ids, &rows, &targets, weight, &vars).unwrap();
    let got_ckpt = checkpointed.loss as f32;
    assert!(((got_ckpt - want_loss) / want_loss).abs() < 1e-5, "{case}: checkpointed loss {got_ckpt} vs {want_loss}");
    let names = lora.params.iter().flat_map(|(m, _, _)| [format!("{m}.lora_A"), format!("{m}.lora_B")]);
    for ((name, var), ckpt) in names.zip(&vars).zip(&checkpointed.grads) {
        let want = &reference[&format!("grad.{name}.weight")];
        let e = rel_err(grads_fused.get(var.as_tensor()).unwrap(), want);
        assert!(e <= 1e-4, "{case}: fused-loss gradient of {name} off by {e:.2e} (relative)");
        let e = rel_err(ckpt.as_ref().unwrap(), want);
        assert!(e <= 1e-4, "{case}: checkpointed gradient of {name} off by {e:.2e} (relative)");
    }

    // Our AdamW (the one `billion finetune` uses, with checkpointable state) against torch.optim.AdamW.
    let vars = lora.vars();
    let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
    let params = AdamWParams { weight_decay: 0.01, ..Default::default() };
    let mut opt = AdamW::new(vars, params).unwrap();
    opt.step(&g, 1e-3).unwrap();
    for (module, a, b) in &lora.params {
        for (which, var) in [("lora_A", a), ("lora_B", b)] {
            let want = &reference[&format!("after_adamw.{module}.{which}.weight")];
            let e = rel_err(var.as_tensor(), want);
            assert!(e <= 1e-5, "{case}: {module}.{which} after AdamW off by {e:.2e}");
        }
    }
    // Merged weights (W + scaling · B A) with the updated adapter.
    let base_st = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    for (module, _, _) in &lora.params {
        let w = &base_st[&format!("{module}.weight")];
        let merged = lora.merged_weight(module, w).unwrap();
        let e = rel_err(&merged, &reference[&format!("merged.{module}.weight")]);
        assert!(e <= 1e-6, "{case}: merged {module} off by {e:.2e}");
    }

    // Our save round-trips the adapter unchanged (PEFT names and shapes).
    let out = tempfile::tempdir().unwrap();
    let fresh = Lora::load(&dir, &Device::Cpu).unwrap();
    fresh.save(out.path()).unwrap();
    let a = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let u = &b[k];
        assert_eq!(t.dims(), u.dims(), "{k}");
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k} bit-exact"
        );
    }
    eprintln!("{case}: loss {got_loss:.6} (peft {want_loss:.6}); gradients, AdamW step and merge match");
}

#[test]
fn llama2_q_v_adapter_matches_peft() {
    check("llama2-tiny");
}

#[test]
fn pythia_fused_qkv_adapter_matches_peft() {
    check("pythia-tiny");
}

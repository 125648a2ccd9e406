//! `billion finetune` end to end on self-made tiny models: a learnable task lowers held-out loss (dense,
//! Q8_0-quantized and GGUF bases), merged models equal base + adapter, a forced NaN keeps the last good
//! adapter, Ctrl-C checkpoints and the printed `--resume` command finishes the same run in place, and
//! `--checkpointing` trains the same adapter.

mod common;

use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_chat_model, write_llama_gguf};
use candle_core::quantized::GgmlDType;
use std::path::Path;
use std::process::{Command, Stdio};

struct Run {
    json: serde_json::Value,
    out: std::path::PathBuf,
}

/// `billion finetune` arguments for a run in `work` (train.jsonl, eval.jsonl when present) writing `OUT` and
/// `OUT.json` there, on the CPU, without dropout (deterministic), batches of 8 unless `extra` sets them;
/// `extra` is appended.
fn args(model: &Path, work: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let p = |f: &str| work.join(f).to_str().unwrap().to_string();
    let mut v: Vec<String> = vec!["finetune".into(), "--model".into(), model.to_str().unwrap().into()];
    v.extend(["--device", "cpu", "--dropout", "0"].map(String::from));
    if !extra.contains(&"--batch-size") {
        v.extend(["--batch-size", "8"].map(String::from));
    }
    v.extend([
        "--data".into(),
        p("train.jsonl"),
        "--out".into(),
        p(out),
        "--results".into(),
        p(&format!("{out}.json")),
    ]);
    if work.join("eval.jsonl").exists() {
        v.extend(["--eval-data".into(), p("eval.jsonl")]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_ok(args: &[String]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_billion")).args(args).output().unwrap();
    assert!(o.status.success(), "finetune failed: {}", common::stderr(&o));
    o
}

fn finetune(model: &Path, work: &Path, extra: &[&str]) -> Run {
    let (train, eval) = (work.join("train.jsonl"), work.join("eval.jsonl"));
    if !train.exists() {
        common::write_even_odd_task(&train, 0, 48);
        common::write_even_odd_task(&eval, 100, 12);
    }
    let mut extra = extra.to_vec();
    extra.extend(["--epochs", "6", "--lr", "1e-2", "--json"]);
    let o = run_ok(&args(model, work, "adapter", &extra));
    let (out, results) = (work.join("adapter"), work.join("adapter.json"));
    let json: serde_json::Value = serde_json::from_str(&common::stdout(&o)).expect("--json prints one JSON object");
    let on_disk: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(on_disk["runs"].as_array().unwrap().last().unwrap()["after"], json["after"]);
    Run { json, out }
}

fn loss(v: &serde_json::Value, when: &str) -> f64 {
    v[when]["loss"].as_f64().unwrap()
}

fn assert_learned(r: &Run, what: &str) {
    let (before, after) = (loss(&r.json, "before"), loss(&r.json, "after"));
    assert!(after < 0.5 * before, "{what}: held-out loss {before:.3} → {after:.3}, expected a clear drop");
    assert!(r.json["after"]["token_accuracy"].as_f64().unwrap() > r.json["before"]["token_accuracy"].as_f64().unwrap());
    assert_eq!(r.json["steps"].as_u64().unwrap(), 36, "6 epochs × 6 steps");
    assert!(r.json["loss_curve"].as_array().unwrap().len() == 36);
    assert!(r.json["trainable_parameters"].as_u64().unwrap() > 0);
}

/// `generate --logits-out` logits for a fixed prompt.
fn logits(model: &Path, extra: &[&str], dir: &Path, name: &str) -> Vec<f32> {
    logits_of(model, &["--prompt", "Is 1234 even?"], extra, dir, name)
}

fn logits_of(model: &Path, prompt: &[&str], extra: &[&str], dir: &Path, name: &str) -> Vec<f32> {
    let file = dir.join(name);
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--device", "cpu"];
    args.extend_from_slice(prompt);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--max-tokens", "0", "--logits-out", file.to_str().unwrap()]);
    let o = common::billion(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    t["logits"].flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn dense_base_learns_saves_peft_adapter_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, 5).unwrap();
    let r = finetune(&model, dir.path(), &["--merge"]);
    assert_learned(&r, "dense");

    // The adapter as peft writes it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    let t = candle_core::safetensors::load(r.out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.len(), 2 * 2 * 2, "2 layers × (q, v) × (A, B)");
    assert_eq!(t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(), &[8, 64]);
    assert_eq!(t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].dims(), &[32, 8]);
    assert!(!r.out.join("checkpoint").exists(), "the checkpoint goes once training finishes");

    // Merged folder == base + adapter (unmerged), and != base.
    let merged = r.out.join("merged");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(merged.join(f).exists(), "merged/{f}");
    }
    let adapter = r.out.to_str().unwrap();
    let with_adapter = logits(&model, &["--adapter", adapter], dir.path(), "a.safetensors");
    let from_merged = logits(&merged, &[], dir.path(), "m.safetensors");
    let base = logits(&model, &[], dir.path(), "b.safetensors");
    assert!(
        max_diff(&with_adapter, &from_merged) < 1e-4,
        "merged differs by {}",
        max_diff(&with_adapter, &from_merged)
    );
    assert!(max_diff(&with_adapter, &base) > 1e-2, "the adapter changes the model");
}

#[test]
fn qlora_on_q8_0_base_learns() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, 6).unwrap();
    // Micro-batches of 4 accumulated in pairs: the same 6 steps per epoch as batches of 8.
    let extra = ["--quantize", "q8_0", "--targets", "all", "--batch-size", "4", "--grad-accum", "2"];
    let r = finetune(&model, dir.path(), &extra);
    assert_learned(&r, "q8_0");
    assert_eq!(r.json["quantization"], "q8_0");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7, "all linear layers of a llama block");
}

#[test]
fn gguf_q8_0_base_learns_and_merges_into_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-q8_0.gguf");
    write_llama_gguf(&gguf, &tiny_config(Architecture::Llama, 320), 7, GgmlDType::Q8_0).unwrap();
    // No chat template in this file: the plain fallback format is used.
    let r = finetune(&gguf, dir.path(), &["--merge", "--targets", "q_proj,k_proj,v_proj,o_proj"]);
    assert_learned(&r, "gguf q8_0");
    let merged = r.out.join("merged.gguf");
    // Dequantized base + adapter vs the merged file: both multiply f32 activations by dense weights, so what
    // remains is the F16 rounding of the merged matrices.
    let adapter = r.out.to_str().unwrap();
    let with_adapter = logits(&gguf, &["--dequantize", "--adapter", adapter], dir.path(), "a.safetensors");
    let from_merged = logits(&merged, &["--dequantize"], dir.path(), "m.safetensors");
    let base = logits(&gguf, &["--dequantize"], dir.path(), "b.safetensors");
    let d = max_diff(&with_adapter, &from_merged);
    assert!(d < 2e-2, "merged GGUF differs from base + adapter by {d}");
    assert!(max_diff(&with_adapter, &base) > 10.0 * d, "the adapter changes the model more than F16 rounding");
}

/// An adapter trained on a GGUF llama (q/k rows in the interleaved-rotary order) is saved in Hugging Face's
/// order: on the transformers-layout folder of the same weights it computes the same function.
#[test]
fn adapter_from_gguf_base_applies_to_the_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama, 320);
    let gguf = dir.path().join("tiny-f32.gguf");
    write_llama_gguf(&gguf, &cfg, 11, GgmlDType::F32).unwrap();
    let folder = dir.path().join("folder");
    billion::testing::write_hf_model(&folder, &cfg, 11).unwrap();
    let r = finetune(&gguf, dir.path(), &["--max-steps", "4", "--targets", "q_proj,k_proj,v_proj"]);
    let adapter = r.out.to_str().unwrap();
    let ids = ["--prompt-ids", "1,50,60,70,80,90,100"];
    let on_gguf = logits_of(&gguf, &ids, &["--adapter", adapter], dir.path(), "g.safetensors");
    let on_folder = logits_of(&folder, &ids, &["--adapter", adapter], dir.path(), "f.safetensors");
    let plain = logits_of(&folder, &ids, &[], dir.path(), "p.safetensors");
    let d = max_diff(&on_gguf, &on_folder);
    assert!(d < 1e-4, "same adapter, same weights, two layouts: logits differ by {d}");
    assert!(max_diff(&on_folder, &plain) > 1e-3, "the adapter changes the model");
}

#[test]
fn forced_nan_stops_with_the_last_good_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, 8).unwrap();
    common::write_even_odd_task(&dir.path().join("train.jsonl"), 0, 48);
    let out = dir.path().join("nan");
    let o = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(args(&model, dir.path(), "nan", &["--lr", "1e-2", "--lr-schedule", "constant"]))
        .env("BILLION_FINETUNE_NAN_AT_STEP", "3")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("loss became NaN at step 3"), "{err}");
    assert!(err.contains("last good adapter (after step 2)"), "{err}");
    // What is on disk is exactly the adapter after two steps.
    let two = dir.path().join("two");
    run_ok(&args(&model, dir.path(), "two", &["--lr", "1e-2", "--lr-schedule", "constant", "--max-steps", "2"]));
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap()
    };
    let (kept, fresh) = (load(&out), load(&two));
    assert_eq!(kept.len(), fresh.len());
    for (k, v) in &kept {
        let d = (v - &fresh[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k}: the kept adapter is the one after step 2");
    }
    assert!(
        kept.iter().any(|(k, v)| k.contains("lora_B") && v.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0),
        "the kept adapter has trained"
    );
}

#[test]
fn ctrl_c_checkpoints_and_resume_finishes_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, 9).unwrap();
    common::write_even_odd_task(&dir.path().join("train.jsonl"), 0, 48);
    common::write_even_odd_task(&dir.path().join("eval.jsonl"), 100, 4);
    let args = |out: &str, extra: &[&str]| {
        let mut v = args(&model, dir.path(), out, &["--lr", "1e-3", "--epochs", "10"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(args("my run", &[]))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = common::interrupt_at_first_step(&mut child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "Ctrl-C ends with 130, as bench does: {log}");
    assert!(log.contains("interrupted at step"), "{log}");
    let ckpt = dir.path().join("my run").join("checkpoint");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    let at = state["step"].as_u64().unwrap();
    assert!(at > 0 && at < 60, "stopped mid-run at step {at}");

    // The printed command continues exactly this run: same outputs (the folder's name needs quoting), same
    // settings, wherever it is run from.
    let printed = log.lines().find_map(|l| l.split_once("continue with: ")).map(|(_, c)| c.to_string());
    let printed = printed.unwrap_or_else(|| panic!("no resume command in: {log}"));
    assert!(printed.contains("--out '") && printed.contains("--results '"), "{printed}");
    let elsewhere = tempfile::tempdir().unwrap();
    let o = Command::new("sh").args(["-c", &format!("exec {printed}")]).current_dir(elsewhere.path()).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains(&format!("resuming at step {at} of 60")), "{}", common::stderr(&o));
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0, "nothing written where it was run");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("my run.json")).unwrap()).unwrap();
    let v = &results["runs"][0];
    assert_eq!(v["steps"].as_u64().unwrap(), 60);
    assert_eq!(v["loss_curve"].as_array().unwrap().len(), 60, "the history continues across the interruption");
    assert!(!ckpt.exists(), "the checkpoint goes once the resumed run finishes");

    // The same run without the interruption ends with the same adapter.
    run_ok(&args("straight", &[]));
    let load = |d: &str| {
        candle_core::safetensors::load(dir.path().join(d).join("adapter_model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (resumed, straight) = (load("my run"), load("straight"));
    for (k, v) in &resumed {
        let d = (v - &straight[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-6, "{k}: the resumed run ends {d} away from the uninterrupted one");
    }
}

/// `--checkpointing` trades memory for time only: the same run with it writes the same adapter (to rounding)
/// and records that it was on.
#[test]
fn checkpointing_trains_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, 8).unwrap();
    common::write_even_odd_task(&dir.path().join("train.jsonl"), 0, 24);
    let steps = ["--epochs", "1", "--max-steps", "3", "--targets", "all", "--show", "0", "--json"];
    let run = |out: &str, extra: &[&str]| {
        let mut a = steps.to_vec();
        a.extend_from_slice(extra);
        let o = run_ok(&args(&model, dir.path(), out, &a));
        let json: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
        let t = candle_core::safetensors::load(
            dir.path().join(out).join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        (json, t)
    };
    let (plain, a) = run("plain", &[]);
    let (ckpt, b) = run("ckpt", &["--checkpointing"]);
    assert_eq!(plain["checkpointing"], false);
    assert_eq!(ckpt["checkpointing"], true);
    let losses = |j: &serde_json::Value| -> Vec<f64> {
        j["loss_curve"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap()).collect()
    };
    for (x, y) in losses(&plain).iter().zip(losses(&ckpt)) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step losses {x} vs {y}");
    }
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4 * m, "{name}: adapters {d} apart (largest value {m})");
    }
}

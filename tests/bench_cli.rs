//! `billion bench` end to end: two small models write all three result files, a second run for one model
//! keeps the other's results, and the JSON follows docs/benchmark_results.schema.json. Values that would
//! measure nothing are refused before any work; charts and tables show short names; quantization says what
//! it kept dense; each model's peak memory is its own; chat models are asked HumanEval with their template.

mod common;

use serde_json::Value;

/// The subset of JSON Schema our schema uses: type, required, properties, items, enum, minimum, maximum.
fn validate(v: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            errors.push(format!("{path}: expected {types:?}, got {v}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(|e| e.as_array()) {
        if !e.contains(v) {
            errors.push(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let (Some(min), Some(x)) = (schema.get("minimum").and_then(|m| m.as_f64()), v.as_f64()) {
        if x < min {
            errors.push(format!("{path}: {x} < {min}"));
        }
    }
    if let (Some(max), Some(x)) = (schema.get("maximum").and_then(|m| m.as_f64()), v.as_f64()) {
        if x > max {
            errors.push(format!("{path}: {x} > {max}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema.get("required").and_then(|r| r.as_array()).into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{path}: missing {r}"));
            }
        }
        for (k, sub) in schema.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
            if let Some(x) = obj.get(k) {
                validate(x, sub, &format!("{path}.{k}"), errors);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(x, items, &format!("{path}[{i}]"), errors);
        }
    }
}

#[test]
fn two_models_then_one_again() {
    let Some(stories) = common::shared("fixtures/stories260K/stories260K.gguf") else { return };
    let mmlu = common::shared("data/mmlu").unwrap();
    let he = common::shared("data/humaneval/HumanEval.jsonl.gz").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&tiny, &cfg, 1, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    let results = dir.path().join("results");
    let models = format!("{},{}", stories.display(), tiny.display());
    let run = |models: &str| {
        let out = common::billion(&[
            "bench",
            "--models",
            models,
            "--mmlu-dir",
            mmlu.to_str().unwrap(),
            "--subjects",
            "abstract_algebra,anatomy",
            "--limit",
            "2",
            "--humaneval-file",
            he.to_str().unwrap(),
            "--max-tokens",
            "16",
            "-p",
            "32",
            "-n",
            "8",
            "-r",
            "2",
            "--results-dir",
            results.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        serde_json::from_str::<Value>(&common::stdout(&out)).unwrap()
    };
    let first = run(&models);
    assert_eq!(first["models"].as_array().unwrap().len(), 2);
    for f in ["benchmark_results.json", "benchmark_results.md", "benchmark_chart.svg"] {
        assert!(results.join(f).exists(), "{f} written");
    }
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("benchmark_results.json")).unwrap()).unwrap();
    let stamp = doc["models"][1]["date_unix"].clone();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmark_results.schema.json")).unwrap(),
    )
    .unwrap();
    let mut errors = vec![];
    validate(&doc, &schema, "$", &mut errors);
    assert!(errors.is_empty(), "schema: {errors:?}");
    let m = &doc["models"][0];
    assert_eq!(m["mmlu"]["questions"], 4, "--limit 2 × 2 subjects");
    assert_eq!(m["humaneval"]["problems"], 2, "--limit applies to HumanEval problems too");
    assert!(m["speed"]["decode"]["mean_tok_s"].as_f64().unwrap() > 0.0);

    // Again for the first model only: the second model's results stay.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = run(&stories.display().to_string());
    assert_eq!(again["models"].as_array().unwrap().len(), 1);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("benchmark_results.json")).unwrap()).unwrap();
    assert_eq!(doc["models"].as_array().unwrap().len(), 2, "other results kept");
    assert_eq!(doc["models"][1]["date_unix"], stamp, "the other model's entry is untouched");
    let md = std::fs::read_to_string(results.join("benchmark_results.md")).unwrap();
    assert!(md.contains("stories260K") && md.contains("tiny.gguf"));
    let svg = std::fs::read_to_string(results.join("benchmark_chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("decode tokens/s") && svg.contains("MMLU accuracy"));
}

#[test]
fn selfcheck_passes_every_canonical_solution() {
    let Some(he) = common::shared("data/humaneval/HumanEval.jsonl.gz") else { return };
    // The first 40 through the CLI (tests/bench_humaneval.rs runs all 164 through the same sandbox).
    let out =
        common::billion(&["bench", "--humaneval-selfcheck", "--limit", "40", "--humaneval-file", he.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("40/40"), "{}", common::stdout(&out));
}

// ---- Self-contained runs on tiny models written by the test ----

use std::path::{Path, PathBuf};

/// A tiny llama GGUF (SentencePiece vocabulary, no chat template).
fn tiny_gguf(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(path, &cfg, 1, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    path.to_path_buf()
}

/// An MMLU folder with one subject: 5 dev rows and `questions` test rows.
fn mmlu_dir(dir: &Path, questions: usize) -> PathBuf {
    let root = dir.join("mmlu");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::create_dir_all(root.join("test")).unwrap();
    let rows = |n: usize, what: &str| -> String {
        (0..n)
            .map(|i| format!("\"{what} {i}: which one?\",one,two,three,four,{}\n", ["A", "B", "C", "D"][i % 4]))
            .collect()
    };
    std::fs::write(root.join("dev/anatomy_dev.csv"), rows(5, "example")).unwrap();
    std::fs::write(root.join("test/anatomy_test.csv"), rows(questions, "question")).unwrap();
    root
}

fn results(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("benchmark_results.json")).unwrap()).unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", common::stderr(out));
}

#[test]
fn edge_values_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(&dir.path().join("tiny.gguf"));
    let mmlu = mmlu_dir(dir.path(), 2);
    let res = dir.path().join("results");
    let (m, d, r) = (model.to_str().unwrap(), mmlu.to_str().unwrap(), res.to_str().unwrap());
    let cases: [(&[&str], &str); 8] = [
        (&["--mmlu", "--limit", "0"], "--limit must be at least 1"),
        (&["--speed", "-r", "0"], "-r/--reps must be at least 1"),
        (&["--humaneval", "--samples", "0"], "--samples must be at least 1"),
        (&["--humaneval", "--samples", "3"], "3 identical greedy completions"),
        (&["--humaneval", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (&["--humaneval", "--timeout", "0"], "--timeout must be"),
        (&["--mmlu", "--shots", "50"], "--shots 50: the dev set of `anatomy` has 5 rows"),
        (&["--speed", "--quantize", "q8_0"], "--quantize"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["bench", "--models", m, "--mmlu-dir", d, "--results-dir", r, "--device", "cpu"];
        args.extend_from_slice(extra);
        let out = common::billion(&args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!res.join("benchmark_results.json").exists(), "{extra:?}: nothing was run");
    }
    for bad in ["0", "many"] {
        let out = common::billion(&["bench", "--models", m, "--mmlu", "--mmlu-dir", d, "--batch-size", bad]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "--batch-size {bad}: {err}");
        assert!(err.contains("--batch-size") && err.contains("≥ 1 or `auto`"), "{err}");
    }
    // A missing second model, or a results folder that cannot be written, stop the run before the first model.
    let missing = dir.path().join("missing.gguf");
    let out = common::billion(&[
        "bench",
        "--models",
        &format!("{m},{}", missing.display()),
        "--speed",
        "--results-dir",
        r,
        "--device",
        "cpu",
    ]);
    assert!(common::stderr(&out).contains("missing.gguf"), "{}", common::stderr(&out));
    assert!(!res.join("benchmark_results.json").exists(), "the first model was not benchmarked");
    let out =
        common::billion(&["bench", "--models", m, "--speed", "--results-dir", "/proc/no/such", "--device", "cpu"]);
    assert!(common::stderr(&out).contains("--results-dir /proc/no/such"), "{}", common::stderr(&out));
}

#[test]
fn every_flag_has_help_and_p_says_it_is_prefill() {
    let (help, flags) = common::assert_every_flag_has_help("bench");
    assert!(flags >= 30, "{help}");
    assert!(help.contains("-p, --prefill") && help.contains("not --prompt"), "{help}");
    assert!(help.contains("[default: 512]") && help.contains("harnesses"), "{help}");
    assert!(help.contains("--humaneval-mode"), "{help}");
}

#[test]
fn selfcheck_honours_limit_and_a_gz_name_must_be_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let file = common::humaneval_file(dir.path(), 3);
    let out = common::billion(&[
        "bench",
        "--humaneval-selfcheck",
        "--limit",
        "2",
        "--humaneval-file",
        file.to_str().unwrap(),
    ]);
    ok(&out);
    assert!(common::stdout(&out).contains("2/2 canonical solutions pass"), "{}", common::stdout(&out));
    let fake = dir.path().join("HumanEval.jsonl.gz");
    std::fs::copy(&file, &fake).unwrap();
    let out = common::billion(&["bench", "--humaneval-selfcheck", "--humaneval-file", fake.to_str().unwrap()]);
    assert!(common::stderr(&out).contains("not a gzip file"), "{}", common::stderr(&out));
}

#[test]
fn chart_and_tables_use_short_names_fitting_units_and_full_scale_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(&dir.path().join("a/rather/long/folder/for/models/tiny-model.gguf"));
    let mmlu = mmlu_dir(dir.path(), 8);
    let res = dir.path().join("results");
    let out = common::billion(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--mmlu",
        "--speed",
        "-p",
        "4",
        "-n",
        "2",
        "-r",
        "1",
        "--mmlu-dir",
        mmlu.to_str().unwrap(),
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    ok(&out);
    let doc = results(&res);
    let accuracy = doc["models"][0]["mmlu"]["accuracy"].as_f64().unwrap();
    let svg = std::fs::read_to_string(res.join("benchmark_chart.svg")).unwrap();
    assert!(svg.contains(">tiny-model (") && !svg.contains("rather/long"), "{svg}");
    // The MMLU bar is the accuracy's share of the 260 px panel, not the full width.
    assert!(svg.contains(&format!("width=\"{:.1}\"", 260.0 * accuracy)), "{accuracy}: {svg}");
    let md = std::fs::read_to_string(res.join("benchmark_results.md")).unwrap();
    let params = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    let count = billion::model::ModelConfig::from_hf_json(&params).unwrap().parameter_count();
    assert!(md.contains(&format!("| tiny-model | llama | {:.1}K |", count as f64 / 1e3)), "{md}");
    assert!(!md.contains("0.00B"), "{md}");
    assert!(common::stdout(&out).contains("| tiny-model |"), "{}", common::stdout(&out));
}

#[test]
fn quantization_records_weights_kept_dense() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("chat");
    billion::testing::write_chat_model(&model, 3).unwrap();
    let res = dir.path().join("results");
    let out = common::billion(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--speed",
        "-p",
        "4",
        "-n",
        "2",
        "-r",
        "1",
        "--quantize",
        "q8_0,q4k",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    ok(&out);
    let doc = results(&res);
    let by_q = |q: &str| doc["models"].as_array().unwrap().iter().find(|m| m["quantization"] == q).unwrap().clone();
    let (q8, q4k) = (by_q("q8_0"), by_q("q4k"));
    // Rows of 64 and 128 are whole q8_0 blocks (32) but not q4k blocks (256).
    assert_eq!(q8["kept_dense"], 0);
    assert!(q4k["kept_dense"].as_u64().unwrap() > 0, "{q4k}");
    assert!(q4k["weights_bytes"].as_u64() > q8["weights_bytes"].as_u64(), "the kept-dense q4k run is the bigger one");
    assert!(common::stderr(&out).contains("weights kept dense"), "{}", common::stderr(&out));
    let md = std::fs::read_to_string(res.join("benchmark_results.md")).unwrap();
    assert!(md.contains("kept dense"), "{md}");
}

#[test]
fn peak_memory_is_each_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let arch = billion::model::config::Architecture::Llama;
    // About 100 MB of f32 weights, then the tiny model.
    let mut big = billion::testing::tiny_config(arch, 320);
    big["hidden_size"] = 1024.into();
    big["intermediate_size"] = 4096.into();
    big["num_attention_heads"] = 16.into();
    big["num_key_value_heads"] = 16.into();
    let write = |name: &str, cfg: &Value| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        d.join("config.json").display().to_string()
    };
    let (big, small) = (write("big", &big), write("small", &billion::testing::tiny_config(arch, 320)));
    let res = dir.path().join("results");
    let out = common::billion(&[
        "bench",
        "--models",
        &format!("{big},{small}"),
        "--random-weights",
        "--speed",
        "-p",
        "4",
        "-n",
        "2",
        "-r",
        "1",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ]);
    ok(&out);
    let doc: Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let peak = |i: usize| doc["models"][i]["peak_rss_bytes"].as_u64().unwrap();
    let weights = doc["models"][0]["weights_bytes"].as_u64().unwrap();
    assert!(peak(0) > weights, "the big model's peak holds its weights: {} vs {weights}", peak(0));
    assert!(peak(1) + weights / 2 < peak(0), "the tiny model's peak is its own: {} vs {}", peak(1), peak(0));
}

#[test]
fn humaneval_asks_chat_models_with_their_template() {
    let dir = tempfile::tempdir().unwrap();
    let chat = dir.path().join("chat");
    billion::testing::write_chat_model(&chat, 5).unwrap();
    let base = tiny_gguf(&dir.path().join("base.gguf"));
    let file = common::humaneval_file(dir.path(), 2);
    let res = dir.path().join("results");
    let run = |models: String, extra: &[&str]| -> Value {
        let mut args = vec![
            "bench",
            "--models",
            &models,
            "--humaneval",
            "--humaneval-file",
            file.to_str().unwrap(),
            "--max-tokens",
            "16",
            "--results-dir",
            res.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = common::billion(&args);
        ok(&out);
        serde_json::from_str(&common::stdout(&out)).unwrap()
    };
    let auto = run(format!("{},{}", chat.display(), base.display()), &[]);
    assert_eq!(auto["models"][0]["humaneval"]["mode"], "instruct", "a chat template: instruct");
    assert_eq!(auto["models"][1]["humaneval"]["mode"], "base", "no template: base");
    assert_eq!(auto["models"][0]["humaneval"]["problems"], 2);
    let md = std::fs::read_to_string(res.join("benchmark_results.md")).unwrap();
    assert!(md.contains("## HumanEval") && md.contains("| chat | none | instruct | 2 |"), "{md}");
    let forced = run(chat.display().to_string(), &["--humaneval-mode", "base"]);
    assert_eq!(forced["models"][0]["humaneval"]["mode"], "base");
}

#[test]
fn sampled_humaneval_reports_pass_at_k() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(&dir.path().join("tiny.gguf"));
    // Whatever the model writes lands inside a string literal that the test code closes, so one problem
    // passes every sample and the other fails every sample: pass@1 and pass@10 are known exactly.
    let problem = |id: &str, want: u32| {
        serde_json::json!({
            "task_id": id,
            "prompt": "def f():\n    return 1\n\n_ = \"\"\"",
            "canonical_solution": "",
            "test": format!("\"\"\"\n\ndef check(c):\n    assert c() == {want}\n"),
            "entry_point": "f",
        })
        .to_string()
    };
    let he = dir.path().join("he.jsonl");
    std::fs::write(&he, [problem("Pass/0", 1), problem("Fail/1", 2)].join("\n")).unwrap();
    let res = dir.path().join("results");
    let out = common::billion(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--humaneval",
        "--humaneval-file",
        he.to_str().unwrap(),
        "--samples",
        "10",
        "--temperature",
        "0.8",
        "--max-tokens",
        "4",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    ok(&out);
    let h = &results(&res)["models"][0]["humaneval"];
    assert_eq!(h["samples"], 10);
    assert_eq!(h["temperature"], 0.8);
    assert_eq!(h["pass_at_1"], 0.5, "{h}");
    assert_eq!(h["pass_at_10"], 0.5, "{h}");
    let per = h["per_problem"].as_array().unwrap();
    assert_eq!((per[0]["samples"].clone(), per[0]["passed"].clone()), (10.into(), 10.into()));
    assert_eq!((per[1]["samples"].clone(), per[1]["passed"].clone()), (10.into(), 0.into()));
}

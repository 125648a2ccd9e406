//! `billion bench` end to end: two small models write all three result files, a second run for one model
//! keeps the other's results, and the JSON follows docs/benchmark_results.schema.json.

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
    let out = common::billion(&["bench", "--humaneval-selfcheck", "--humaneval-file", he.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("164/164"), "{}", common::stdout(&out));
}

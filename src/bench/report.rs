//! Benchmark results, llama-bench's printers: one versioned JSON document updated in place (other models'
//! results are kept), a Markdown report, a console table and an SVG chart, all drawn from typed
//! [`ModelRecord`]s. Every file is written atomically.
//!
//! The document on disk is merged as JSON so that entries and fields written by other versions survive a
//! save untouched; the printers read its entries as records.

use super::records::ModelRecord;
use crate::util::{human_bytes, write_atomic};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const SCHEMA_VERSION: u64 = 1;

/// The stable key of a stored entry (see [`ModelRecord::key`]).
pub fn key(record: &Value) -> String {
    format!(
        "{}|{}|{}",
        record["name"].as_str().unwrap_or(""),
        record["quantization"].as_str().unwrap_or(""),
        record["device"].as_str().unwrap_or("")
    )
}

/// The results document at `path` (an empty one when there is no file yet).
pub fn load(path: &Path) -> Result<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
            anyhow::ensure!(
                v["schema_version"].as_u64() == Some(SCHEMA_VERSION),
                "{}: schema_version {} is not {SCHEMA_VERSION}",
                path.display(),
                v["schema_version"]
            );
            Ok(v)
        }
        Err(_) => Ok(json!({"schema_version": SCHEMA_VERSION, "models": []})),
    }
}

/// The document's entries as records (missing fields take their defaults, unknown ones are kept in `extra`).
pub fn records(doc: &Value) -> Result<Vec<ModelRecord>> {
    doc["models"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| {
            serde_json::from_value(m.clone())
                .with_context(|| format!("results: models[{i}] ({}) is not a benchmark record", key(m)))
        })
        .collect()
}

/// Put `record` into `doc`'s models, replacing the fields of the entry with the same key: evaluators not
/// run this time keep their earlier figures, other entries stay as they are.
pub fn merge(doc: &mut Value, record: Value) -> Result<()> {
    let models = doc["models"].as_array_mut().context("results: no models list")?;
    let k = key(&record);
    match models.iter_mut().find(|m| key(m) == k) {
        Some(existing) => {
            for (field, v) in record.as_object().into_iter().flatten() {
                existing[field] = v.clone();
            }
        }
        None => models.push(record),
    }
    Ok(())
}

/// Merge `record` into the results file (replacing the same key) and rewrite the Markdown and the chart.
pub fn save(dir: &Path, record: &ModelRecord) -> Result<Value> {
    let path = dir.join("benchmark_results.json");
    let mut doc = load(&path)?;
    merge(&mut doc, serde_json::to_value(record)?)?;
    doc["updated_unix"] = json!(crate::util::now());
    let all = records(&doc)?;
    write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    write_atomic(&dir.join("benchmark_results.md"), markdown(&all).as_bytes())?;
    write_atomic(&dir.join("benchmark_chart.svg"), chart(&all).as_bytes())?;
    Ok(doc)
}

/// One run's records as a results document (what `--json` prints).
pub fn json_document(records: &[ModelRecord]) -> Result<String> {
    let doc = json!({"schema_version": SCHEMA_VERSION, "models": serde_json::to_value(records)?});
    Ok(serde_json::to_string_pretty(&doc)?)
}

/// A figure that was measured (JSON keeps no NaN: what was stored as null reads back as NaN).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.and_then(finite).map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "—".into())
}

fn pct(v: Option<f64>) -> String {
    v.and_then(finite).map(|x| format!("{:.1}%", 100.0 * x)).unwrap_or_else(|| "—".into())
}

fn bytes(v: Option<u64>) -> String {
    v.map(human_bytes).unwrap_or_else(|| "—".into())
}

fn mmlu_accuracy(m: &ModelRecord) -> Option<f64> {
    m.mmlu.as_ref().map(|x| x.accuracy).and_then(finite)
}

fn decode_tok_s(m: &ModelRecord) -> Option<f64> {
    m.speed.as_ref().and_then(|s| s.decode.as_ref()).map(|d| d.mean_tok_s).and_then(finite)
}

/// One figure of a record, where it was measured.
type Figure = fn(&ModelRecord) -> Option<f64>;

fn is_quantized(m: &ModelRecord) -> bool {
    !m.quantization.is_empty() && m.quantization != "none"
}

/// A model's short name for tables and charts: a file's stem (`tiny` for /models/tiny.gguf), a folder's name,
/// the folder of a config.json, the last part of a hub name (`SmolLM2-135M` for HuggingFaceTB/SmolLM2-135M),
/// an alias as it is.
pub fn short_name(name: &str) -> String {
    let path = std::path::Path::new(name.trim_end_matches('/'));
    let Some(file) = path.file_name().map(|f| f.to_string_lossy().into_owned()) else { return name.to_string() };
    if file.ends_with(".json") {
        if let Some(dir) = path.parent().and_then(|p| p.file_name()) {
            return dir.to_string_lossy().into_owned();
        }
    }
    match file.strip_suffix(".gguf") {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ => file,
    }
}

/// The names shown for `models`: short names, except where two different models would share one.
fn display_names(models: &[ModelRecord]) -> Vec<String> {
    let short: Vec<String> = models.iter().map(|m| short_name(&m.name)).collect();
    models
        .iter()
        .zip(&short)
        .map(|(m, s)| {
            let clash = models.iter().zip(&short).any(|(o, os)| os == s && o.name != m.name);
            if clash {
                m.name.clone()
            } else {
                s.clone()
            }
        })
        .collect()
}

/// A parameter count in B, M or K: 1.71B, 135.0M, 262.1K.
pub fn parameters(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// The summary table (also printed on the console).
pub fn summary_table(models: &[ModelRecord]) -> String {
    let mut s = String::from(
        "| model | arch | params | weights | device | MMLU | HumanEval pass@1 | prefill tok/s | decode tok/s | TTFT ms | peak RSS | peak GPU memory |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (m, name) in models.iter().zip(display_names(models)) {
        let speed = m.speed.as_ref();
        let name = if m.interrupted { format!("{name} (interrupted)") } else { name };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            name,
            m.architecture,
            parameters(m.parameters),
            m.quantization,
            m.device,
            pct(mmlu_accuracy(m)),
            pct(m.humaneval.as_ref().map(|h| h.pass_at_1)),
            f(speed.and_then(|s| s.prefill.as_ref()).map(|p| p.mean_tok_s), 1),
            f(decode_tok_s(m), 1),
            f(speed.map(|s| s.ttft_ms), 1),
            bytes(m.peak_rss_bytes),
            bytes(m.gpu_memory_peak_bytes),
        ));
    }
    s
}

pub fn markdown(models: &[ModelRecord]) -> String {
    let names = display_names(models);
    let mut s = String::from("# Benchmark results\n\nWritten by `billion bench`.\n\n## Summary\n\n");
    s.push_str(&summary_table(models));
    if models.iter().any(|m| m.interrupted) {
        s.push_str("\n## Interrupted runs\n\nCtrl-C stopped these runs; their figures cover only what finished.\n\n");
        for (m, name) in models.iter().zip(&names).filter(|(m, _)| m.interrupted) {
            let mut parts = vec![];
            if let Some(x) = m.mmlu.as_ref().filter(|x| x.interrupted) {
                parts.push(format!("MMLU stopped after {} questions", x.questions));
            }
            if let Some(x) = m.humaneval.as_ref().filter(|x| x.interrupted) {
                parts.push(format!("HumanEval stopped after {} problems", x.problems));
            }
            if !m.not_run.is_empty() {
                parts.push(format!("not run: {}", m.not_run.join(", ")));
            }
            s.push_str(&format!("- {name} ({}, {}): interrupted; {}\n", m.quantization, m.device, parts.join("; ")));
        }
    }
    if names.iter().zip(models).any(|(n, m)| *n != m.name) {
        s.push_str("\n## Models\n\n| model | as named | source |\n| --- | --- | --- |\n");
        let mut seen = std::collections::BTreeSet::new();
        for (m, name) in models.iter().zip(&names) {
            if seen.insert(&m.name) {
                s.push_str(&format!("| {name} | {} | {} |\n", m.name, m.source));
            }
        }
    }
    if models.iter().any(|m| m.mmlu.is_some()) {
        s.push_str("\n## MMLU by group\n\n| model | weights | shots | questions | stem | humanities | social_sciences | other | all |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (m, name) in models.iter().zip(&names) {
            let Some(mmlu) = &m.mmlu else { continue };
            let g = |name: &str| pct(mmlu.groups.get(name).map(|g| g.accuracy));
            let questions =
                if mmlu.interrupted { format!("{} (interrupted)", mmlu.questions) } else { mmlu.questions.to_string() };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                name,
                m.quantization,
                mmlu.shots,
                questions,
                g("stem"),
                g("humanities"),
                g("social_sciences"),
                g("other"),
                pct(Some(mmlu.accuracy)),
            ));
        }
    }
    if models.iter().any(|m| m.humaneval.is_some()) {
        s.push_str("\n## HumanEval\n\n| model | weights | mode | problems | samples | temperature | pass@1 | pass@10 | sandbox |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (m, name) in models.iter().zip(&names) {
            let Some(h) = &m.humaneval else { continue };
            let problems = if h.interrupted { format!("{} (interrupted)", h.problems) } else { h.problems.to_string() };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                name,
                m.quantization,
                if h.mode.is_empty() { "base" } else { &h.mode },
                problems,
                h.samples,
                f(Some(h.temperature), 2),
                pct(Some(h.pass_at_1)),
                pct(h.pass_at_10),
                if h.sandbox.is_empty() { "—" } else { &h.sandbox },
            ));
        }
    }
    // The quantization table: every quantized run beside its model's unquantized one.
    if models.iter().any(is_quantized) {
        s.push_str("\n## Quantization\n\n| model | weights | memory per 1B params | kept dense | decode tok/s | MMLU | Δ MMLU | Δ mean log-likelihood |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (m, name) in models.iter().zip(&names) {
            let base = models.iter().find(|b| b.name == m.name && b.quantization == "none" && b.device == m.device);
            let per_b = human_bytes((m.weights_bytes as f64 / (m.parameters as f64 / 1e9)) as u64);
            let delta = |get: Figure| -> String {
                match (get(m), base.and_then(get)) {
                    (Some(a), Some(b)) if m.quantization != "none" => format!("{:+.4}", a - b),
                    _ => "—".into(),
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                name,
                m.quantization,
                per_b,
                m.kept_dense,
                f(decode_tok_s(m), 1),
                pct(mmlu_accuracy(m)),
                delta(mmlu_accuracy),
                delta(|r| r.mmlu.as_ref().map(|x| x.mean_loglik_correct).and_then(finite)),
            ));
        }
    }
    if models.iter().any(|m| m.kept_dense > 0) {
        s.push_str("\n\"kept dense\": weights whose rows are not whole blocks of the quantized type stay in the compute dtype, so such a run can be bigger than one with a smaller block (q4k blocks are 256 wide, q8_0 and q4_0 blocks 32).\n");
    }
    s.push_str("\n![decode speed and MMLU](benchmark_chart.svg)\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Two horizontal bar panels: decode tokens/s (scaled to the fastest model) and MMLU accuracy (scaled to 100%)
/// per model, labelled with short model names.
pub fn chart(models: &[ModelRecord]) -> String {
    const MAX_LABEL: usize = 48;
    let labels: Vec<String> = display_names(models)
        .iter()
        .zip(models)
        .map(|(name, m)| {
            let l = format!("{name} ({}, {})", m.quantization, m.device);
            if l.chars().count() > MAX_LABEL {
                // Keep the end, which tells models apart.
                let tail: String = l.chars().rev().take(MAX_LABEL - 1).collect::<Vec<_>>().into_iter().rev().collect();
                format!("…{tail}")
            } else {
                l
            }
        })
        .collect();
    let row_h = 26.0;
    // About 7 px per character at 12 px sans-serif, and a margin on each side.
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let label_w = (longest as f64 * 7.0 + 30.0).max(120.0);
    let bar_w = 260.0;
    let height = 70.0 + row_h * models.len().max(1) as f64;
    let width = label_w + 2.0 * (bar_w + 110.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // (title, the value, the value of a full bar, colour)
    let fastest = models.iter().filter_map(decode_tok_s).fold(0.0, f64::max).max(1e-9);
    let panels: [(&str, Figure, f64, &str); 2] =
        [("decode tokens/s", decode_tok_s, fastest, "#4c72b0"), ("MMLU accuracy", mmlu_accuracy, 1.0, "#dd8452")];
    for (pi, (title, get, full, color)) in panels.iter().enumerate() {
        let x0 = label_w + pi as f64 * (bar_w + 110.0);
        s.push_str(&format!("<text x=\"{x0}\" y=\"24\" font-weight=\"bold\">{title}</text>\n"));
        for (i, m) in models.iter().enumerate() {
            let y = 40.0 + i as f64 * row_h;
            if pi == 0 {
                s.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                    label_w - 10.0,
                    y + 15.0,
                    esc(&labels[i])
                ));
            }
            match get(m) {
                Some(v) => {
                    let w = bar_w * (v / full).clamp(0.0, 1.0);
                    let text = if pi == 1 { format!("{:.1}%", 100.0 * v) } else { format!("{v:.1}") };
                    s.push_str(&format!(
                        "<rect x=\"{x0}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>\n",
                        row_h - 6.0
                    ));
                    s.push_str(&format!("<text x=\"{:.1}\" y=\"{}\">{text}</text>\n", x0 + w + 5.0, y + 15.0));
                }
                None => s.push_str(&format!("<text x=\"{x0}\" y=\"{}\" fill=\"#888\">not measured</text>\n", y + 15.0)),
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::records::{MmluRecord, SpeedRecord};
    use crate::bench::speed::Throughput;

    fn record(name: &str, quantization: &str) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            architecture: "llama".into(),
            parameters: 2_000_000_000,
            quantization: quantization.into(),
            device: "cpu".into(),
            weights_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn merge_replaces_only_the_fields_of_the_same_entry() {
        let mut doc = json!({"schema_version": 1, "models": [
            {"name": "a", "quantization": "none", "device": "cpu", "mmlu": {"accuracy": 0.5}, "note": 1},
            {"name": "b", "quantization": "none", "device": "cpu", "date_unix": 7},
        ]});
        let mut a = record("a", "none");
        a.date_unix = 9;
        merge(&mut doc, serde_json::to_value(&a).unwrap()).unwrap();
        merge(&mut doc, serde_json::to_value(record("a", "q8_0")).unwrap()).unwrap();
        let models = doc["models"].as_array().unwrap();
        assert_eq!(models.len(), 3);
        assert_eq!(models[0]["date_unix"], 9);
        assert_eq!(models[0]["mmlu"]["accuracy"], 0.5, "an evaluator not run keeps its earlier figures");
        assert_eq!(models[0]["note"], 1, "unknown fields are kept");
        assert_eq!(models[1]["date_unix"], 7, "other entries are untouched");
        let recs = records(&doc).unwrap();
        assert_eq!(recs[0].extra["note"], 1);
        assert_eq!(recs[2].key(), "a|q8_0|cpu");
    }

    #[test]
    fn printers_show_what_was_measured() {
        let mut base = record("m", "none");
        base.mmlu = Some(MmluRecord { accuracy: 0.5, mean_loglik_correct: -1.0, ..Default::default() });
        let mut q = record("m", "q4_0");
        q.mmlu = Some(MmluRecord { accuracy: 0.25, mean_loglik_correct: f64::NAN, ..Default::default() });
        let tp = Throughput { tokens: 8, mean_tok_s: 12.34, sd_tok_s: 0.0, runs: vec![12.34] };
        q.speed = Some(SpeedRecord { decode: Some(tp), ttft_ms: 3.0, ..Default::default() });
        let models = [base, q];
        let table = summary_table(&models);
        assert!(table.contains("| m | llama | 2.00B | none | cpu | 50.0% | — | — | — | — | — | — |"), "{table}");
        assert!(table.contains("| m | llama | 2.00B | q4_0 | cpu | 25.0% | — | — | 12.3 | 3.0 | — | — |"), "{table}");
        let md = markdown(&models);
        assert!(md.contains("## MMLU by group") && md.contains("## Quantization"), "{md}");
        assert!(md.contains("| m | q4_0 | 512.00 MiB | 0 | 12.3 | 25.0% | -0.2500 | — |"), "{md}");
        let svg = chart(&models);
        assert!(svg.contains("m (q4_0, cpu)") && svg.contains("not measured") && svg.contains(">12.3<"));
    }

    #[test]
    fn names_are_short_and_parameters_use_fitting_units() {
        assert_eq!(short_name("/models/tiny.gguf"), "tiny");
        assert_eq!(short_name("/models/SmolLM2-135M-Instruct/"), "SmolLM2-135M-Instruct");
        assert_eq!(short_name("/models/pythia/config.json"), "pythia");
        assert_eq!(short_name("HuggingFaceTB/SmolLM2-135M"), "SmolLM2-135M");
        assert_eq!(short_name("tinyllama"), "tinyllama");
        assert_eq!(parameters(1_710_000_000), "1.71B");
        assert_eq!(parameters(134_515_008), "134.5M");
        assert_eq!(parameters(262_144), "262.1K");
        assert_eq!(parameters(999), "999");
        // Two different models with one short name keep their full names.
        let (a, b) = (record("/x/model/config.json", "none"), record("/y/model/config.json", "none"));
        assert_eq!(display_names(&[a, b]), ["/x/model/config.json", "/y/model/config.json"]);
    }

    #[test]
    fn chart_scales_mmlu_to_full_accuracy_and_leaves_room_for_labels() {
        let mut m = record("/a/very/long/path/to/some/models/folder/SmolLM2-135M-Instruct.Q4_1.gguf", "none");
        m.mmlu = Some(MmluRecord { accuracy: 0.2, ..Default::default() });
        let svg = chart(&[m]);
        assert!(svg.contains(">SmolLM2-135M-Instruct.Q4_1 (none, cpu)<") && !svg.contains("/a/very"), "{svg}");
        // A 20% model draws a fifth of the 260 px bar, not all of it.
        assert!(svg.contains("width=\"52.0\""), "{svg}");
        let label_w: f64 = svg
            .split("text-anchor=\"end\"")
            .next()
            .unwrap()
            .rsplit("x=\"")
            .next()
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(label_w >= 7.0 * "SmolLM2-135M-Instruct.Q4_1 (none, cpu)".len() as f64, "{label_w}");
    }
}

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
    doc["updated_unix"] = json!(now());
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

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

/// The summary table (also printed on the console).
pub fn summary_table(models: &[ModelRecord]) -> String {
    let mut s = String::from(
        "| model | arch | params | weights | device | MMLU | HumanEval pass@1 | prefill tok/s | decode tok/s | TTFT ms | peak RSS | peak GPU memory |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for m in models {
        let speed = m.speed.as_ref();
        s.push_str(&format!(
            "| {} | {} | {:.2}B | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.name,
            m.architecture,
            m.parameters as f64 / 1e9,
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
    let mut s = String::from("# Benchmark results\n\nWritten by `billion bench`.\n\n## Summary\n\n");
    s.push_str(&summary_table(models));
    if models.iter().any(|m| m.mmlu.is_some()) {
        s.push_str("\n## MMLU by group\n\n| model | weights | shots | questions | stem | humanities | social_sciences | other | all |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for m in models {
            let Some(mmlu) = &m.mmlu else { continue };
            let g = |name: &str| pct(mmlu.groups.get(name).map(|g| g.accuracy));
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                m.name,
                m.quantization,
                mmlu.shots,
                mmlu.questions,
                g("stem"),
                g("humanities"),
                g("social_sciences"),
                g("other"),
                pct(Some(mmlu.accuracy)),
            ));
        }
    }
    // The quantization table: every quantized run beside its model's unquantized one.
    if models.iter().any(is_quantized) {
        s.push_str("\n## Quantization\n\n| model | weights | memory per 1B params | decode tok/s | MMLU | Δ MMLU | Δ mean log-likelihood |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for m in models {
            let base = models.iter().find(|b| b.name == m.name && b.quantization == "none" && b.device == m.device);
            let per_b = human_bytes((m.weights_bytes as f64 / (m.parameters as f64 / 1e9)) as u64);
            let delta = |get: Figure| -> String {
                match (get(m), base.and_then(get)) {
                    (Some(a), Some(b)) if m.quantization != "none" => format!("{:+.4}", a - b),
                    _ => "—".into(),
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                m.name,
                m.quantization,
                per_b,
                f(decode_tok_s(m), 1),
                pct(mmlu_accuracy(m)),
                delta(mmlu_accuracy),
                delta(|r| r.mmlu.as_ref().map(|x| x.mean_loglik_correct).and_then(finite)),
            ));
        }
    }
    s.push_str("\n![decode speed and MMLU](benchmark_chart.svg)\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Two horizontal bar panels: decode tokens/s and MMLU accuracy per model.
pub fn chart(models: &[ModelRecord]) -> String {
    let label = |m: &ModelRecord| format!("{} ({}, {})", m.name, m.quantization, m.device);
    let row_h = 26.0;
    let (label_w, bar_w) = (330.0, 260.0);
    let height = 70.0 + row_h * models.len().max(1) as f64;
    let width = label_w + 2.0 * (bar_w + 110.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // (title, the value, colour)
    let panels: [(&str, Figure, &str); 2] =
        [("decode tokens/s", decode_tok_s, "#4c72b0"), ("MMLU accuracy", mmlu_accuracy, "#dd8452")];
    for (pi, (title, get, color)) in panels.iter().enumerate() {
        let x0 = label_w + pi as f64 * (bar_w + 110.0);
        let max = models.iter().filter_map(get).fold(0.0, f64::max).max(1e-9);
        s.push_str(&format!("<text x=\"{x0}\" y=\"24\" font-weight=\"bold\">{title}</text>\n"));
        for (i, m) in models.iter().enumerate() {
            let y = 40.0 + i as f64 * row_h;
            if pi == 0 {
                s.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                    label_w - 10.0,
                    y + 15.0,
                    esc(&label(m))
                ));
            }
            match get(m) {
                Some(v) => {
                    let w = bar_w * v / max;
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
        assert!(md.contains("| m | q4_0 | 512.00 MiB | 12.3 | 25.0% | -0.2500 | — |"), "{md}");
        let svg = chart(&models);
        assert!(svg.contains("m (q4_0, cpu)") && svg.contains("not measured") && svg.contains(">12.3<"));
    }
}

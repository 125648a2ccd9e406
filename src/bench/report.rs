//! Benchmark results: one versioned JSON document updated in place (other models' results are kept), a
//! Markdown report, a console table and an SVG chart. Every file is written atomically.

use crate::util::{human_bytes, write_atomic};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const SCHEMA_VERSION: u64 = 1;

/// The stable key of a result: the same model, quantization and device replace their earlier result.
pub fn key(record: &Value) -> String {
    format!(
        "{}|{}|{}",
        record["name"].as_str().unwrap_or(""),
        record["quantization"].as_str().unwrap_or(""),
        record["device"].as_str().unwrap_or("")
    )
}

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

/// Merge `record` into the results file (replacing the same key) and rewrite the Markdown and the chart.
pub fn save(dir: &Path, record: Value) -> Result<Value> {
    let path = dir.join("benchmark_results.json");
    let mut doc = load(&path)?;
    let models = doc["models"].as_array_mut().context("results: no models list")?;
    let k = key(&record);
    match models.iter_mut().find(|m| key(m) == k) {
        // Evaluators not run this time keep their earlier figures.
        Some(existing) => {
            for (field, v) in record.as_object().into_iter().flatten() {
                existing[field] = v.clone();
            }
        }
        None => models.push(record),
    }
    doc["updated_unix"] = json!(now());
    write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    write_atomic(&dir.join("benchmark_results.md"), markdown(&doc).as_bytes())?;
    write_atomic(&dir.join("benchmark_chart.svg"), chart(&doc).as_bytes())?;
    Ok(doc)
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64().map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "—".into())
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|x| format!("{:.1}%", 100.0 * x)).unwrap_or_else(|| "—".into())
}

/// The summary table (also printed on the console).
pub fn summary_table(doc: &Value) -> String {
    let mut s = String::from(
        "| model | arch | params | weights | device | MMLU | HumanEval pass@1 | prefill tok/s | decode tok/s | TTFT ms | peak RSS | peak GPU memory |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for m in doc["models"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {:.2}B | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m["name"].as_str().unwrap_or(""),
            m["architecture"].as_str().unwrap_or(""),
            m["parameters"].as_f64().unwrap_or(0.0) / 1e9,
            m["quantization"].as_str().unwrap_or(""),
            m["device"].as_str().unwrap_or(""),
            pct(&m["mmlu"]["accuracy"]),
            pct(&m["humaneval"]["pass_at_1"]),
            f(&m["speed"]["prefill"]["mean_tok_s"], 1),
            f(&m["speed"]["decode"]["mean_tok_s"], 1),
            f(&m["speed"]["ttft_ms"], 1),
            m["peak_rss_bytes"].as_u64().map(human_bytes).unwrap_or_else(|| "—".into()),
            m["gpu_memory_peak_bytes"].as_u64().map(human_bytes).unwrap_or_else(|| "—".into()),
        ));
    }
    s
}

pub fn markdown(doc: &Value) -> String {
    let mut s = String::from("# Benchmark results\n\nWritten by `billion bench`.\n\n## Summary\n\n");
    s.push_str(&summary_table(doc));
    let models: Vec<&Value> = doc["models"].as_array().into_iter().flatten().collect();
    if models.iter().any(|m| m["mmlu"].is_object()) {
        s.push_str("\n## MMLU by group\n\n| model | weights | shots | questions | stem | humanities | social_sciences | other | all |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for m in models.iter().filter(|m| m["mmlu"].is_object()) {
            let g = &m["mmlu"]["groups"];
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                m["name"].as_str().unwrap_or(""),
                m["quantization"].as_str().unwrap_or(""),
                m["mmlu"]["shots"],
                m["mmlu"]["questions"],
                pct(&g["stem"]["accuracy"]),
                pct(&g["humanities"]["accuracy"]),
                pct(&g["social_sciences"]["accuracy"]),
                pct(&g["other"]["accuracy"]),
                pct(&m["mmlu"]["accuracy"]),
            ));
        }
    }
    // The quantization table: every quantized run beside its model's unquantized one.
    let quantized: Vec<&&Value> =
        models.iter().filter(|m| m["quantization"].as_str().is_some_and(|q| q != "none")).collect();
    if !quantized.is_empty() {
        s.push_str("\n## Quantization\n\n| model | weights | memory per 1B params | decode tok/s | MMLU | Δ MMLU | Δ mean log-likelihood |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for m in &models {
            let base = models
                .iter()
                .find(|b| b["name"] == m["name"] && b["quantization"] == "none" && b["device"] == m["device"]);
            let per_b = m["weights_bytes"]
                .as_f64()
                .zip(m["parameters"].as_f64())
                .map(|(w, p)| human_bytes((w / (p / 1e9)) as u64))
                .unwrap_or_else(|| "—".into());
            let delta = |path: &[&str]| -> String {
                let get = |v: &Value| path.iter().fold(v.clone(), |acc, k| acc[*k].clone()).as_f64();
                match (get(m), base.and_then(|b| get(b))) {
                    (Some(a), Some(b)) if m["quantization"] != "none" => format!("{:+.4}", a - b),
                    _ => "—".into(),
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                m["name"].as_str().unwrap_or(""),
                m["quantization"].as_str().unwrap_or(""),
                per_b,
                f(&m["speed"]["decode"]["mean_tok_s"], 1),
                pct(&m["mmlu"]["accuracy"]),
                delta(&["mmlu", "accuracy"]),
                delta(&["mmlu", "mean_loglik_correct"]),
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
pub fn chart(doc: &Value) -> String {
    let models: Vec<&Value> = doc["models"].as_array().into_iter().flatten().collect();
    let label = |m: &Value| {
        format!(
            "{} ({}, {})",
            m["name"].as_str().unwrap_or(""),
            m["quantization"].as_str().unwrap_or(""),
            m["device"].as_str().unwrap_or("")
        )
    };
    let row_h = 26.0;
    let (label_w, bar_w) = (330.0, 260.0);
    let height = 70.0 + row_h * models.len().max(1) as f64;
    let width = label_w + 2.0 * (bar_w + 110.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // (title, JSON path of the value, colour)
    let panels = [
        ("decode tokens/s", ["speed", "decode", "mean_tok_s"].as_slice(), "#4c72b0"),
        ("MMLU accuracy", ["mmlu", "accuracy"].as_slice(), "#dd8452"),
    ];
    for (pi, (title, path, color)) in panels.iter().enumerate() {
        let get = |m: &Value| path.iter().fold(m, |v, k| &v[*k]).as_f64();
        let x0 = label_w + pi as f64 * (bar_w + 110.0);
        let max = models.iter().filter_map(|m| get(m)).fold(0.0, f64::max).max(1e-9);
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

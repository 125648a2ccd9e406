//! The models `billion` knows by a short name: their hub repo, shape facts, license and usual GGUF.

#[derive(Debug, Clone, serde::Serialize)]
pub struct KnownModel {
    pub alias: &'static str,
    pub repo_id: &'static str,
    pub architecture: &'static str,
    /// Parameters, in billions.
    pub params_b: f64,
    pub license: &'static str,
    /// Gated repos need the license accepted on the hub and HF_TOKEN set.
    pub gated: bool,
    /// A repo with GGUF quantizations of the same model, when one is usual.
    pub gguf_repo: Option<&'static str>,
    /// What the model is for here.
    pub role: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        alias: "tinyllama",
        repo_id: "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        architecture: "llama",
        params_b: 1.10,
        license: "apache-2.0",
        gated: false,
        gguf_repo: Some("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"),
        role: "seed",
    },
    KnownModel {
        alias: "llama-3.2-1b",
        repo_id: "meta-llama/Llama-3.2-1B-Instruct",
        architecture: "llama",
        params_b: 1.24,
        license: "llama3.2",
        gated: true,
        gguf_repo: Some("bartowski/Llama-3.2-1B-Instruct-GGUF"),
        role: "seed",
    },
    KnownModel {
        alias: "stablelm-2-1.6b",
        repo_id: "stabilityai/stablelm-2-1_6b-chat",
        architecture: "stablelm",
        params_b: 1.64,
        license: "stabilityai-non-commercial-research-community",
        gated: true,
        gguf_repo: Some("second-state/stablelm-2-zephyr-1.6b-GGUF"),
        role: "seed",
    },
    KnownModel {
        alias: "pythia-1b",
        repo_id: "EleutherAI/pythia-1b",
        architecture: "gpt_neox",
        params_b: 1.01,
        license: "apache-2.0",
        gated: false,
        gguf_repo: None,
        role: "seed",
    },
    KnownModel {
        alias: "smollm2-135m",
        repo_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture: "llama",
        params_b: 0.135,
        license: "apache-2.0",
        gated: false,
        gguf_repo: Some("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"),
        role: "draft / tests",
    },
    KnownModel {
        alias: "llama-2-7b",
        repo_id: "meta-llama/Llama-2-7b-chat-hf",
        architecture: "llama",
        params_b: 6.74,
        license: "llama2",
        gated: true,
        gguf_repo: Some("TheBloke/Llama-2-7B-Chat-GGUF"),
        role: "speculative target (tinyllama)",
    },
    KnownModel {
        alias: "llama-3.1-8b",
        repo_id: "meta-llama/Llama-3.1-8B-Instruct",
        architecture: "llama",
        params_b: 8.03,
        license: "llama3.1",
        gated: true,
        gguf_repo: Some("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"),
        role: "speculative target (llama-3.2-1b)",
    },
];

/// Datasets `billion bench` uses, by short name: (alias, repo id, files to fetch by prefix).
pub const KNOWN_DATASETS: &[(&str, &str, &[&str])] = &[
    ("mmlu", "cais/mmlu", &["all/dev", "all/validation", "all/test"]),
    ("humaneval", "openai/openai_humaneval", &["openai_humaneval/"]),
];

pub fn find(alias_or_repo: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.alias.eq_ignore_ascii_case(alias_or_repo) || m.repo_id == alias_or_repo)
}

/// A model name as the hub knows it: an alias becomes its repo id; `org/name` stays.
pub fn repo_id(name: &str) -> Option<String> {
    if let Some(m) = find(name) {
        return Some(m.repo_id.to_string());
    }
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match name.split_once('/') {
        Some((org, repo)) if valid(org) && valid(repo) && !repo.contains('/') => Some(name.to_string()),
        _ => None,
    }
}

/// Which files of a model repo we fetch: what loading needs, not .bin / .pth / onnx copies.
pub fn wanted_model_file(name: &str) -> bool {
    const EXACT: [&str; 7] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    ];
    !name.contains('/') && (EXACT.contains(&name) || name.ends_with(".safetensors"))
}

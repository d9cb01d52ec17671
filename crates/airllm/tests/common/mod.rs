#![allow(dead_code)]
//! Shared helpers for the fixture tests.

#[path = "../../../../tests/support/broken.rs"]
pub mod broken;

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf")
}

pub const MODELS: &[&str] = &[
    "llama-gqa2-llama3rope",
    "llama-mqa-tied-linear-bf16",
    "mistral-sliding-window",
    "qwen2-bias-mha-sharded",
    "qwen3-qknorm-headdim",
    "gemma3-sliding-global",
];

pub struct Reference {
    pub prompt_ids: Vec<Vec<u32>>,
    pub prompts: Vec<String>,
    pub greedy: Vec<Vec<u32>>,
    pub logits: Vec<Vec<Vec<f32>>>,
    pub json: serde_json::Value,
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

pub fn reference(name: &str) -> Reference {
    let dir = fixtures().join(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let prompt_ids = ids(&json["prompt_token_ids"]);
    let logits = (0..prompt_ids.len())
        .map(|i| t[&format!("logits_{i}")].to_vec2::<f32>().unwrap())
        .collect();
    Reference {
        prompts: json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
        greedy: ids(&json["greedy_token_ids"]),
        prompt_ids,
        logits,
        json,
    }
}

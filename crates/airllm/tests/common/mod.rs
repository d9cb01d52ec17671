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
    reference_at(&fixtures().join(name))
}

/// The goldens of the fixture in `dir`.
pub fn reference_at(dir: &std::path::Path) -> Reference {
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

/// A JSON list of token ids.
pub fn id_list(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON list of numbers.
pub fn float_list(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Last-position logits of every prompt, in one batched step.
pub fn last_logits(e: &mut airllm::Engine, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut seqs: Vec<_> = prompts.iter().map(|_| e.new_sequence().unwrap()).collect();
    let mut batch: Vec<_> = seqs
        .iter_mut()
        .zip(prompts)
        .map(|(s, p)| (s, p.as_slice()))
        .collect();
    e.step(&mut batch, airllm::LogitsFor::Last)
        .unwrap()
        .into_iter()
        .map(|t| t.squeeze(0).unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// `n` greedy tokens per prompt, past EOS, in one batch.
pub fn greedy(
    e: &mut airllm::Engine,
    tok: &airllm::tokenizer::TextTokenizer,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    let p = airllm::generate::GenerationParams {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    airllm::generate::generate(e, tok, prompts, &p, |_, _| {})
        .unwrap()
        .into_iter()
        .map(|c| c.token_ids)
        .collect()
}

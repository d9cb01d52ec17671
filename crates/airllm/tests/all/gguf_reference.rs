//! The engine against llama.cpp on the default model, Gemma 3 270M Q4_K_M (fetched by
//! scripts/fetch_default_model.sh; references made by scripts/make_gguf_reference.py).

use crate::common::{float_list as floats, greedy, id_list as ids, last_logits};
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, ModelInfo};

use crate::common;
use serde_json::Value;

fn model() -> std::path::PathBuf {
    airllm::hub::default_model()
        .expect("the default model is needed: run scripts/fetch_default_model.sh")
}

fn reference() -> Value {
    let p = common::fixture("gguf/gemma3-270m-reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn engine(dequantize: bool, budget: u64, prompts: &[Vec<u32>]) -> Engine {
    let info = ModelInfo::open_with(&model(), dequantize).unwrap();
    let total: usize = prompts.iter().map(Vec::len).sum();
    Engine::from_info(
        info,
        EngineOptions {
            max_memory: Some(budget),
            context: 128,
            max_batch: prompts.len(),
            max_step_tokens: total,
            max_logit_rows: prompts.len(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The reference, its prompts' token ids, and the model's tokenizer.
fn setup() -> (Value, Vec<Vec<u32>>, TextTokenizer) {
    let r = reference();
    let prompts = r["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    (r, prompts, TextTokenizer::open(&model()).unwrap())
}

#[test]
fn tokenization_matches_llama_cpp() {
    let r = reference();
    let tok = TextTokenizer::open(&model()).unwrap();
    for case in r["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "token ids of {text:?}"
        );
    }
}

#[test]
fn dequantized_model_matches_llama_cpp_f32() {
    let (r, prompts, tok) = setup();
    // Streamed: the budget holds a few layers, and the head is read in chunks.
    let mut e = engine(true, 400 << 20, &prompts);
    assert!(
        e.plan().streamed_layers > 0 && !e.plan().head_resident,
        "{}",
        e.plan()
    );
    let ours = last_logits(&mut e, &prompts);
    let sample = ids(&r["sample_ids"]);
    let mut worst = 0f32;
    for (i, want) in r["f32"].as_array().unwrap().iter().enumerate() {
        for (ids, vals) in [
            (ids(&want["top_ids"]), floats(&want["top_logits"])),
            (sample.clone(), floats(&want["sample_logits"])),
        ] {
            let mut w = 0f32;
            for (id, v) in ids.iter().zip(vals) {
                w = w.max((ours[i][*id as usize] - v).abs());
            }
            eprintln!("prompt {i} ({} tokens): max diff {w}", prompts[i].len());
            worst = worst.max(w);
        }
    }
    assert!(
        worst <= 1e-2,
        "max abs logit difference {worst} against llama.cpp's F32 run"
    );
    let got = greedy(&mut e, &tok, &prompts, 32);
    for (g, want) in got.iter().zip(r["f32"].as_array().unwrap()) {
        assert_eq!(g, &ids(&want["greedy"]));
    }
}

#[test]
fn quantized_model_agrees_with_llama_cpp_within_its_own_noise() {
    let (r, prompts, tok) = setup();
    let mut e = engine(false, 100 << 20, &prompts);
    assert!(!e.plan().head_resident, "{}", e.plan());
    let ours = last_logits(&mut e, &prompts);
    for (i, want) in r["q4km"].as_array().unwrap().iter().enumerate() {
        let top = ids(&want["top5_ids"]);
        let vals = floats(&want["top5_logits"]);
        for (id, v) in top.iter().zip(&vals) {
            let d = (ours[i][*id as usize] - v).abs();
            assert!(d <= 1.0, "prompt {i}: logit of token {id} differs by {d}");
        }
        if vals[0] - vals[1] > 0.75 {
            assert_eq!(
                airllm::generate::argmax(&ours[i]),
                top[0],
                "prompt {i}: top-1"
            );
        }
    }
    let got = greedy(&mut e, &tok, &prompts, 32);
    for (i, (g, want)) in got.iter().zip(r["q4km"].as_array().unwrap()).enumerate() {
        let want_ids = ids(&want["greedy"]);
        let margins = floats(&want["margins"]);
        let stable = margins.iter().take_while(|&&m| m >= 0.75).count();
        assert_eq!(
            g[..stable],
            want_ids[..stable],
            "prompt {i}: greedy tokens before the first close call (step {stable})"
        );
    }
}

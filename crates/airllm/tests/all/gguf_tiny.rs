//! The engine against llama.cpp on tiny GGUF files written by llama.cpp's own converter
//! (scripts/make_tiny_gguf.py), per architecture, in F32 and Q8_0.

use std::path::PathBuf;

use crate::common::{float_list as floats, id_list as ids, last_logits};
use airllm::generate::argmax;
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, ModelInfo};

use crate::common;
use serde_json::Value;

const MODELS: &[&str] = &[
    "llama",
    "mistral-as-llama",
    "qwen2",
    "qwen3",
    "gemma3",
    "gemma2",
    "mixtral",
    "qwen2moe",
    "qwen3moe",
    "phi3",
    "deepseek2-lite",
    "deepseek2-v3",
    "glm4moe",
    "glm4",
    "gpt-oss-mxfp4",
    "gpt-oss",
];
/// The Q8_0 references. Gemma 2, the MoE models and Phi-3 have none yet: the llama-cpp-python
/// 0.3.36 build of the machine that made them stopped with an illegal instruction on Q8_0 files
/// (the F32 ones ran).
const Q8_MODELS: &[&str] = &["llama", "mistral-as-llama", "qwen2", "qwen3", "gemma3"];

/// Files whose llama.cpp logits depart from transformers', with the transformers fixture they
/// were converted from. llama.cpp 0.3.36's `glm4moe` graph gives other logits than
/// transformers at a few tokens of each prompt (by up to 5) whenever fewer than all experts
/// are routed; routing all experts, the two agree exactly, and the same routing code gives
/// transformers' numbers for DeepSeek-V3 (docs/benchmarks.md, issue 25). The engine computes
/// transformers' function, so these files are checked against transformers (its 16 greedy
/// tokens are also llama.cpp's first ones).
const LOGITS_FROM_TRANSFORMERS: &[(&str, &str)] = &[("glm4moe", "glm4moe-partial-rotary")];

fn dir() -> PathBuf {
    common::fixture("gguf/tiny")
}

struct Case {
    engine: Engine,
    tok: TextTokenizer,
    r: Value,
    prompts: Vec<Vec<u32>>,
}

/// Opens a fixture streamed at its minimum budget, so every layer and the head are read from disk.
fn open(name: &str, ty: &str) -> Case {
    let path = dir().join(format!("{name}-{ty}.gguf"));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
            .unwrap();
    let prompts = common::prompt_ids(&r);
    let total: usize = prompts.iter().map(Vec::len).sum();
    let mut opts = EngineOptions {
        max_memory: Some(1),
        context: 96,
        max_batch: prompts.len(),
        max_step_tokens: total,
        max_logit_rows: prompts.len(),
        ..Default::default()
    };
    let info = ModelInfo::open(&path).unwrap();
    opts.max_memory = Some(match info.plan(&opts) {
        Err(airllm::Error::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!(
            "{name}: expected a minimum, got {:?}",
            other.map(|p| p.budget)
        ),
    });
    let engine = Engine::from_info(info, opts).unwrap();
    assert_eq!(
        engine.plan().resident_layers,
        0,
        "{name}: {}",
        engine.plan()
    );
    Case {
        engine,
        tok: TextTokenizer::open(&path).unwrap(),
        r,
        prompts,
    }
}

fn greedy_of(c: &mut Case) -> Vec<Vec<u32>> {
    common::greedy(&mut c.engine, &c.tok, &c.prompts, 32)
}

#[test]
fn tokenization_matches_llama_cpp() {
    for name in MODELS {
        let c = open(name, "f32");
        for case in c.r["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                c.tok.encode(text).unwrap(),
                ids(&case["ids"]),
                "{name}: {text:?}"
            );
        }
        for (p, want) in c.r["prompts"].as_array().unwrap().iter().zip(&c.prompts) {
            assert_eq!(&c.tok.encode(p.as_str().unwrap()).unwrap(), want, "{name}");
        }
    }
}

#[test]
fn f32_files_give_llama_cpp_logits_and_greedy_tokens() {
    for name in MODELS {
        let mut c = open(name, "f32");
        let ours = last_logits(&mut c.engine, &c.prompts);
        let wants: Vec<Vec<f32>> = match LOGITS_FROM_TRANSFORMERS.iter().find(|(n, _)| n == name) {
            Some((_, hf)) => {
                let r = common::reference(hf);
                assert_eq!(r.prompt_ids, c.prompts, "{name}: the same prompts");
                r.logits.iter().map(|l| l.last().unwrap().clone()).collect()
            }
            None => c.r["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(floats)
                .collect(),
        };
        for (i, want) in wants.into_iter().enumerate() {
            let d = ours[i]
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-3, "{name}: prompt {i}: max abs logit diff {d}");
        }
        let got = greedy_of(&mut c);
        let wants: Vec<Vec<u32>> = match LOGITS_FROM_TRANSFORMERS.iter().find(|(n, _)| n == name) {
            Some((_, hf)) => common::reference(hf).greedy,
            None => c.r["greedy"].as_array().unwrap().iter().map(ids).collect(),
        };
        for (g, want) in got.iter().zip(&wants) {
            assert_eq!(&g[..want.len()], &want[..], "{name}: greedy tokens");
        }
    }
}

#[test]
fn q8_0_files_agree_on_every_clear_top_1() {
    for name in Q8_MODELS {
        let mut c = open(name, "q8_0");
        let ours = last_logits(&mut c.engine, &c.prompts);
        for (i, want) in c.r["logits"].as_array().unwrap().iter().enumerate() {
            let want = floats(want);
            let mut sorted = want.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 0.5 {
                assert_eq!(argmax(&ours[i]), argmax(&want), "{name}: prompt {i}: top-1");
            }
        }
        let got = greedy_of(&mut c);
        let margins = c.r["margins"].as_array().unwrap();
        for (i, (g, want)) in got
            .iter()
            .zip(c.r["greedy"].as_array().unwrap())
            .enumerate()
        {
            let stable = floats(&margins[i]).iter().take_while(|&&m| m > 0.5).count();
            assert_eq!(
                g[..stable],
                ids(want)[..stable],
                "{name}: prompt {i}: greedy tokens before the first margin under 0.5"
            );
        }
    }
}

/// DeepSeek's, GLM's and Kimi K2's pre-tokenizers (`deepseek-llm`, `deepseek-v3`, `glm4`,
/// `kimi-k2`) split text as
/// llama.cpp does: vocabulary-only files whose merges cross every kind of boundary
/// (scripts/make_pretok_gguf.py).
#[test]
fn deepseek_and_glm_pre_tokenizers_match_llama_cpp() {
    for pre in ["deepseek-llm", "deepseek-v3", "glm4", "kimi-k2"] {
        let path = common::fixture(&format!("gguf/pretok/{pre}.gguf"));
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
                .unwrap();
        let tok = TextTokenizer::open(&path).unwrap();
        for case in r["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&case["ids"]),
                "{pre}: {text:?}"
            );
        }
    }
}

/// GPT-OSS's config turns off YaRN's rounding of its correction band to whole dimensions
/// (`truncate: false`, as OpenAI's reference computes it); llama.cpp always rounds, which is
/// why its greedy tokens leave transformers' after a few steps on the tiny model. A GGUF file
/// computes llama.cpp's function (the test above); with the rounding turned off, the same F32
/// file gives transformers' tokens exactly.
#[test]
fn gpt_oss_departs_from_transformers_by_yarn_rounding_alone() {
    let path = dir().join("gpt-oss-f32.gguf");
    let r = common::reference("gpt-oss-bf16-experts");
    let total: usize = r.prompt_ids.iter().map(Vec::len).sum();
    let opts = EngineOptions {
        max_memory: Some(1 << 30),
        context: 96,
        max_batch: r.prompt_ids.len(),
        max_step_tokens: total,
        max_logit_rows: r.prompt_ids.len(),
        ..Default::default()
    };
    let tok = TextTokenizer::open(&path).unwrap();
    let run = |truncate: bool| {
        let mut info = ModelInfo::open(&path).unwrap();
        match &mut info.cfg.rope.scaling {
            airllm::config::RopeScaling::Yarn { truncate: t, .. } => *t = truncate,
            other => panic!("expected YaRN, got {other:?}"),
        }
        let mut e = Engine::from_info(info, opts.clone()).unwrap();
        common::greedy(&mut e, &tok, &r.prompt_ids, 16)
    };
    assert_eq!(run(false), r.greedy);
    assert_ne!(run(true), r.greedy);
}

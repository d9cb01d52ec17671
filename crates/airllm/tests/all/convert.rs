//! `airllm convert` against transformers and llama.cpp:
//! - a conversion to F32 GGUF computes the same logits as the transformers folder it came from;
//! - a Q8_0 conversion is byte-identical to the one llama.cpp was run on
//!   (scripts/make_convert_interop.py), and we produce llama.cpp's greedy tokens on it;
//! - a GGUF dequantized back to a transformers folder computes what the GGUF does.

use std::path::{Path, PathBuf};

use crate::common::{fixtures, id_list as ids, last_logits, MODELS};
use airllm::convert::{to_gguf, to_hf, Quant};
use airllm::tokenizer::TextTokenizer;
use airllm::Engine;

use crate::common;

fn engine(path: &Path, prompts: &[Vec<u32>]) -> Engine {
    let opts = common::batch_options(prompts, 96, false);
    Engine::open(path, opts).unwrap()
}

fn convert(name: &str, q: Quant, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-{}.gguf", q.name()));
    to_gguf(&fixtures().join(name), q, &out, &[], &mut |_, _| {}).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn f32_conversion_computes_what_the_source_does() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS.iter().filter(|n| has_gguf_arch(n)) {
        let r = common::reference(name);
        let gguf = convert(name, Quant::F32, tmp.path());
        let ours = last_logits(&mut engine(&gguf, &r.prompt_ids), &r.prompt_ids);
        let src = match LLAMA_CPP_FUNCTION.iter().find(|(n, _)| n == name) {
            // The GGUF form computes llama.cpp's function, which differs from the source's:
            // compared with llama.cpp's logits on its own converter's file of the same model.
            Some((_, gguf)) => {
                let path = common::fixture("gguf/tiny").join(format!("{gguf}-f32.json"));
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
                assert_eq!(
                    common::prompt_ids(&v),
                    r.prompt_ids,
                    "{name}: the same prompts"
                );
                v["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(common::float_list)
                    .collect()
            }
            None => last_logits(
                &mut engine(&fixtures().join(name), &r.prompt_ids),
                &r.prompt_ids,
            ),
        };
        for (i, (a, b)) in ours.iter().zip(&src).enumerate() {
            let d = max_diff(a, b);
            // Gemma's GGUF form runs llama.cpp's f16-table GELU, which moves logits ~1e-3;
            // llama.cpp's own logits are within 1e-3 of ours (tests/all/gguf_tiny.rs).
            let tol = if name.starts_with("gemma") {
                2e-2
            } else if LLAMA_CPP_FUNCTION.iter().any(|(n, _)| n == name) {
                1e-3
            } else {
                1e-4
            };
            assert!(d <= tol, "{name}: prompt {i}: max logit diff {d}");
        }
        // The converted tokenizer tokenizes as the original does.
        let tok = TextTokenizer::open(&gguf).unwrap();
        for (p, want) in r.prompts.iter().zip(&r.prompt_ids) {
            assert_eq!(&tok.encode(p).unwrap(), want, "{name}: {p:?}");
        }
    }
}

/// Fixtures whose GGUF form computes llama.cpp's function rather than the source's, with
/// llama.cpp's converted file of them: GPT-OSS (llama.cpp rounds YaRN's band, and multiplies
/// MXFP4 experts by Q8_0 activations).
const LLAMA_CPP_FUNCTION: &[(&str, &str)] = &[
    ("gpt-oss-mxfp4", "gpt-oss-mxfp4"),
    ("gpt-oss-bf16-experts", "gpt-oss"),
];

fn fnv1a64(path: &Path) -> u64 {
    airllm::util::fnv1a64(&std::fs::read(path).unwrap())
}

#[test]
fn q8_0_conversion_gives_llama_cpp_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let refs = common::fixture("gguf/convert");
    let mut checked = 0;
    let mut total_clear = 0;
    for entry in std::fs::read_dir(&refs).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let (name, quant) = if let Some(n) = file.strip_suffix("-q8_0.json") {
            (n, Quant::Q8_0)
        } else if let Some(n) = file.strip_suffix("-f32.json") {
            (n, Quant::F32)
        } else {
            continue;
        };
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let gguf = convert(name, quant, tmp.path());
        assert_eq!(
            std::fs::metadata(&gguf).unwrap().len(),
            r["bytes"].as_u64().unwrap(),
            "{name}: size differs from the file llama.cpp was run on"
        );
        assert_eq!(
            fnv1a64(&gguf).to_string(),
            r["fnv1a64"].as_str().unwrap(),
            "{name}: bytes differ from the file llama.cpp was run on"
        );
        let tok = TextTokenizer::open(&gguf).unwrap();
        let prompts: Vec<Vec<u32>> = r["prompt_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (p, want) in r["prompts"].as_array().unwrap().iter().zip(&prompts) {
            assert_eq!(&tok.encode(p.as_str().unwrap()).unwrap(), want, "{name}");
        }
        let mut e = engine(&gguf, &prompts);
        let got = common::greedy(&mut e, &tok, &prompts, 24);
        for (i, g) in got.iter().enumerate() {
            let want = ids(&r["greedy"][i]);
            let margins = common::float_list(&r["margins"][i]);
            // Both sides multiply the same Q8_0 blocks, but quantize activations and sum in
            // their own ways, which moves these tiny models' logits by up to ~0.1 (the F32
            // conversion matches llama.cpp to ~1e-4). Every token up to the first step where
            // llama.cpp's top two are within 0.2 (0.01 in F32) must agree.
            let close = if quant == Quant::F32 { 0.01 } else { 0.2 };
            let clear = margins.iter().take_while(|&&m| m > close).count();
            total_clear += clear;
            assert_eq!(
                g[..clear],
                want[..clear],
                "{name}: prompt {i}: greedy tokens (first {clear} steps)"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 13, "expected thirteen interop references");
    assert!(total_clear >= 60, "only {total_clear} steps compared");
}

#[test]
fn dequantized_folder_computes_what_the_gguf_does() {
    // Gemma's GGUF side computes llama.cpp's f16-table GELU, which moves logits by up to ~5e-3;
    // its norms are stored as 1 + w there and as w in the folder, which a wrong transform would
    // break by far more.
    for (name, tolerance) in [
        ("qwen3-qknorm-headdim", 1e-4),
        ("gemma3-sliding-global", 2e-2),
        ("gemma2-softcap-alternating", 2e-2),
        // Experts: stacked into one tensor per layer, and split back.
        ("mixtral-moe", 1e-4),
        ("qwen2moe-shared-expert", 1e-4),
        ("qwen3moe-dense-layer", 1e-4),
        // LongRoPE's factor sets travel as tensors, its partial rotary as a dimension count.
        ("phi-three-longrope-partial", 1e-4),
        // Latent attention: kv_b_proj split per head into attn_k_b/attn_v_b and joined back;
        // YaRN's mscale_all_dim as llama.cpp's log multiplier. GLM's norms and fused gate-up.
        ("deepseek-v3-mla-noaux-yarn", 1e-4),
        ("glm4moe-partial-rotary", 1e-4),
        ("glm4-dense", 1e-4),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let r = common::reference(name);
        let gguf = convert(name, Quant::Q8_0, tmp.path());
        let hf = tmp.path().join("back");
        to_hf(&gguf, &hf, &mut |_, _| {}).unwrap();
        // The GGUF with its blocks widened to f32 at load is the same function as the folder.
        let opts = common::batch_options(&r.prompt_ids, 96, false);
        let info = airllm::ModelInfo::open_with(&gguf, true).unwrap();
        let mut widened = Engine::from_info(info, opts).unwrap();
        let a = last_logits(&mut widened, &r.prompt_ids);
        let b = last_logits(&mut engine(&hf, &r.prompt_ids), &r.prompt_ids);
        for (x, y) in a.iter().zip(&b) {
            let d = max_diff(x, y);
            assert!(d <= tolerance, "{name}: max logit diff {d}");
        }
        let tok = TextTokenizer::open(&hf).unwrap();
        for (p, want) in r.prompts.iter().zip(&r.prompt_ids) {
            assert_eq!(&tok.encode(p).unwrap(), want, "{name}");
        }
    }
}

/// Whether the fixture's architecture has a GGUF form in this version.
fn has_gguf_arch(name: &str) -> bool {
    let info = airllm::ModelInfo::open(&fixtures().join(name)).unwrap();
    airllm::weights::gguf_keys::arch_name(info.cfg.arch).is_some()
}

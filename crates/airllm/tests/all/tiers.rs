//! The three tiers (device, host, disk) without a GPU: a simulated CPU "device" with a budget of
//! its own takes the first layers, the host budget the next, and the rest is read from disk for
//! every step. Checks the split, the bytes that cross each link, and that the results equal a
//! plain CPU run's, for every fixture architecture, float and quantized.

use crate::common;

use std::path::Path;

use crate::common::{batch_options, fixtures, last_logits, prompt_ids, reference, tiered, MODELS};
use airllm::weights::schema::LayerSchema;
use airllm::{Engine, EngineOptions, LogitsFor, ModelInfo};

/// Weight bytes one step must copy to the device: every matrix of the layers not on the
/// device, and the head when it is not there either.
fn expected_moved(e: &Engine, path: &Path) -> u64 {
    let info = ModelInfo::open(path).unwrap();
    let dp = e.plan().device.clone().unwrap();
    let naming = info.src.naming();
    let mut n = 0;
    for layer in dp.resident_layers..info.cfg.num_layers {
        // Latent attention's kv_b_proj is absorbed on the host, as read: it never crosses.
        let crossing = LayerSchema::new(&info.cfg, layer);
        for t in crossing.matrices().filter(|t| {
            use airllm::weights::Role;
            !matches!(t.role, Role::KvB | Role::KB | Role::VB)
        }) {
            n += info.src.meta(&t.name(naming, layer)).unwrap().compute_bytes;
        }
    }
    if !dp.head_resident {
        n += info.src.meta(&info.head_name).unwrap().file_bytes;
    }
    n
}

/// Runs `prompts` plain and tiered, twice each (so the reader wraps around), and compares.
fn check(name: &str, path: &Path, base: EngineOptions, prompts: &[Vec<u32>]) {
    let mut plain = Engine::open(path, base.clone()).unwrap();
    let want = last_logits(&mut plain, prompts);

    let opts = tiered(path, &base);
    let mut e = Engine::open(path, opts.clone()).unwrap();
    let plan = e.plan().clone();
    let dp = plan.device.clone().unwrap();
    assert_eq!(dp.resident_layers, 1, "{name}: {plan}");
    assert_eq!(plan.resident_layers, 1, "{name}: {plan}");
    assert!(plan.streamed_layers >= 1, "{name}: {plan}");
    let text = plan.to_string();
    assert!(
        text.contains("1 on the device, 1 in host memory") && text.contains("per token: disk→host"),
        "{name}: {text}"
    );
    let per_step = expected_moved(&e, path);
    // Experts stay in host memory and are copied over each time they run.
    // In their held form (an FP8 expert's rows carry their block scales).
    let info = ModelInfo::open(path).unwrap();
    let expert_bytes = info
        .cfg
        .moe
        .as_ref()
        .and_then(|m| m.sparse.iter().position(|&s| s))
        .map_or(0, |l| {
            LayerSchema::new(&info.cfg, l)
                .experts()
                .map(|t| {
                    let name = t.expert_name(info.src.naming(), l, 0).0;
                    let m = info.src.meta(&name).unwrap();
                    // A stack of experts (GGUF, GPT-OSS) holds them all under one name.
                    let stacked = if m.shape.len() == 3 { m.shape[0] } else { 1 };
                    m.compute_bytes / stacked as u64
                })
                .sum()
        });
    let mut want_moved = 0;
    for _ in 1..=2u64 {
        let before = e.expert_stats().unwrap_or_default();
        let got = last_logits(&mut e, prompts);
        assert_eq!(got, want, "{name}: tiered run differs from the plain run");
        let used = e.expert_stats().unwrap_or_default().since(&before);
        want_moved += per_step + (used.hits + used.misses) * expert_bytes;
        assert_eq!(e.bytes_moved(), want_moved, "{name}: bytes moved");
    }
    // The plan's figure counts whole layers as held (norms and alignment included).
    assert!(dp.bytes_moved_per_token >= per_step, "{name}");
    assert!(e.ledger().peak() <= plan.budget, "{name}: host ledger");
    let dl = e.device_ledger().unwrap();
    assert!(dl.peak() <= dp.budget, "{name}: device ledger");
    // The KV cache is charged to the device.
    let held = dl.held();
    let s = e.new_sequence().unwrap();
    assert!(dl.held() > held, "{name}: KV cache not on the device");
    drop(s);
}

#[test]
fn hf_fixtures_tiered_equal_plain() {
    for name in MODELS {
        let r = reference(name);
        let base = batch_options(&r.prompt_ids, 64, false);
        check(name, &fixtures().join(name), base, &r.prompt_ids);
    }
}

#[test]
fn quantized_gguf_tiered_equal_plain() {
    let dir = common::fixture("gguf/tiny");
    for name in ["llama", "gemma3"] {
        let path = dir.join(format!("{name}-q8_0.gguf"));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
                .unwrap();
        let prompts = prompt_ids(&r);
        check(name, &path, batch_options(&prompts, 96, false), &prompts);
    }
}

#[test]
fn decode_steps_move_what_the_plan_says() {
    let name = MODELS[0];
    let path = fixtures().join(name);
    let r = reference(name);
    let base = EngineOptions {
        max_memory: Some(1 << 30),
        context: 64,
        max_batch: 2,
        max_step_tokens: 64,
        ..Default::default()
    };
    let mut e = Engine::open(&path, tiered(&path, &base)).unwrap();
    let per_step = expected_moved(&e, &path);
    let mut s = e.new_sequence().unwrap();
    e.step(&mut [(&mut s, &r.prompt_ids[0][..])], LogitsFor::Last)
        .unwrap();
    for _ in 0..3 {
        e.step(&mut [(&mut s, &[1u32][..])], LogitsFor::Last)
            .unwrap();
    }
    // A prefill chunk without logits skips the head.
    let mut s2 = e.new_sequence().unwrap();
    let before = e.bytes_moved();
    e.step(&mut [(&mut s2, &[1u32, 2][..])], LogitsFor::None)
        .unwrap();
    let head = if e.plan().device.as_ref().unwrap().head_resident {
        0
    } else {
        ModelInfo::open(&path)
            .unwrap()
            .src
            .meta(&ModelInfo::open(&path).unwrap().head_name)
            .unwrap()
            .file_bytes
    };
    assert_eq!(e.bytes_moved() - before, per_step - head);
    assert_eq!(e.decode_profile.steps, 3);
    assert_eq!(e.decode_profile.moved, 3 * per_step);
}

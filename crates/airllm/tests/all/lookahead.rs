//! Expert look-ahead changes when experts are read, never the tokens. It reads ahead only for
//! layers whose guesses are nearly all right, so what it reads more is a small share of what
//! it reads ahead; on routing that consecutive layers share, its guesses are right and are
//! read ahead. Models come from `synth` (tiny-moe, 8 layers), written here.

use std::path::Path;

use airllm::stream::ExpertStats;
use airllm::synth::{preset, write_hf, SynthRouting};
use airllm::weights::safetensors::DType;
use airllm::{Engine, EngineOptions, LogitsFor, ModelInfo};

use crate::common;

fn synth(dir: &Path, routing: SynthRouting) {
    let mut shape = preset("tiny-moe").unwrap();
    shape.layers = 8;
    shape.routing = routing;
    write_hf(&shape, DType::F32, 7, 1 << 40, dir, |_, _| {}).unwrap();
}

fn options(budget: u64, lookahead: bool) -> EngineOptions {
    EngineOptions {
        max_memory: Some(budget),
        context: 64,
        max_batch: 1,
        max_step_tokens: 16,
        max_logit_rows: 1,
        expert_lookahead: lookahead,
        ..Default::default()
    }
}

/// Greedy tokens after a fixed prompt, and the expert cache's counts over the decode.
fn decode(e: &mut Engine, n: usize) -> (Vec<u32>, ExpertStats) {
    let mut seq = e.new_sequence().unwrap();
    let prompt: Vec<u32> = (3..11).collect();
    let mut logits = e
        .step(&mut [(&mut seq, &prompt[..])], LogitsFor::Last)
        .unwrap();
    let before = e.expert_stats().unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let row = logits[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let t = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        out.push(t);
        logits = e
            .step(&mut [(&mut seq, &[t][..])], LogitsFor::Last)
            .unwrap();
    }
    (out, e.expert_stats().unwrap().since(&before))
}

/// Budgets from the minimum (no room for the routers' copies) to all experts cached, the two
/// between with look-ahead planned: two slots, and about half the experts.
fn budgets(dir: &Path) -> Vec<u64> {
    let info = ModelInfo::open(dir).unwrap();
    let min = common::minimum(&info, &options(1, true));
    let routers = info.sizes.router_bytes;
    let half = info.sizes.experts_total as u64 / 2 * info.sizes.expert_bytes;
    vec![min, min + routers, min + routers + half, 1 << 30]
}

#[test]
fn the_plan_keeps_the_routers_copies_only_when_there_is_room_and_something_to_guess() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth(&dir, SynthRouting::Random);
    let info = ModelInfo::open(&dir).unwrap();
    let b = budgets(&dir);
    let planned: Vec<u64> = b
        .iter()
        .map(|&x| info.plan(&options(x, true)).unwrap().lookahead_bytes)
        .collect();
    let r = info.sizes.router_bytes;
    assert!(r > 0);
    assert_eq!(planned, vec![0, r, r, 0]);
    let p = info.plan(&options(b[1], true)).unwrap();
    assert_eq!(p.expert_slots, 2, "{p}");
    assert!(p.total_bytes() <= b[1], "{p}");
    assert!(
        format!("{p}").contains("expert look-ahead: where it pays"),
        "{p}"
    );
    // Asked not to: no copies, and the slots they would have taken.
    assert_eq!(info.plan(&options(b[2], false)).unwrap().lookahead_bytes, 0);
}

#[test]
fn random_weights_give_the_same_tokens_and_read_ahead_only_where_layers_are_predictable() {
    // Random weights do not make routing unpredictable: each layer adds a share of the
    // residual stream that shrinks with depth, so the later layers' choices can be guessed
    // (about 90% right here) while the first ones' cannot. Look-ahead reads only for those,
    // and what it reads more is its wrong guesses.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth(&dir, SynthRouting::Random);
    for budget in budgets(&dir) {
        let (want, off) = decode(&mut Engine::open(&dir, options(budget, false)).unwrap(), 24);
        let mut e = Engine::open(&dir, options(budget, true)).unwrap();
        let planned = e.plan().lookahead_bytes > 0;
        let (got, on) = decode(&mut e, 24);
        assert_eq!(got, want, "budget {budget}");
        assert_eq!(off.guessed, 0);
        assert_eq!(planned, on.guessed > 0, "budget {budget}: {on:?}");
        // Besides its wrong guesses, a read ahead may evict an expert a later step uses: two
        // experts' worth over a warm cache's handful of reads.
        let expert = ModelInfo::open(&dir).unwrap().sizes.expert_file_bytes;
        assert!(
            on.bytes_read <= off.bytes_read + on.wasted_bytes + off.bytes_read / 50 + 2 * expert,
            "budget {budget}: {on:?} against {off:?}"
        );
        // A fifth of the read-ahead at most, past the first couple of guesses a warm cache
        // reads at all.
        assert!(
            on.wasted_bytes * 5 <= on.ahead_bytes + 10 * expert,
            "budget {budget}: {on:?}"
        );
    }
}

#[test]
fn correlated_routing_is_guessed_and_read_ahead_with_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth(&dir, SynthRouting::Correlated { strength: 2.0 });
    let b = budgets(&dir);
    for &budget in &b[1..3] {
        let (want, off) = decode(&mut Engine::open(&dir, options(budget, false)).unwrap(), 24);
        let (got, on) = decode(&mut Engine::open(&dir, options(budget, true)).unwrap(), 24);
        assert_eq!(got, want, "budget {budget}");
        let p = on.precision().unwrap();
        assert!(p >= 0.8, "budget {budget}: precision {p}");
        assert!(on.read_ahead > 0, "budget {budget}: {on:?}");
        // Right guesses replace reads, they do not add to them.
        assert!(
            on.wasted_bytes * 5 <= on.ahead_bytes,
            "budget {budget}: {on:?}"
        );
        assert!(
            on.bytes_read as f64 <= 1.1 * off.bytes_read as f64,
            "budget {budget}: {on:?} against {off:?}"
        );
        assert!(
            on.misses < off.misses,
            "budget {budget}: {on:?} against {off:?}"
        );
    }
}

#[test]
fn a_routing_trace_has_a_line_per_sparse_layer_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth(&dir, SynthRouting::Random);
    let trace = tmp.path().join("trace.jsonl");
    let mut e = Engine::open(
        &dir,
        EngineOptions {
            expert_trace: Some(trace.clone()),
            ..options(1 << 30, true)
        },
    )
    .unwrap();
    decode(&mut e, 3);
    drop(e);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The prompt's step and three decode steps (the last one's logits unused), 8 layers each.
    assert_eq!(lines.len(), 4 * 8);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], (i / 8) as u64);
        assert_eq!(l["layer"], (i % 8) as u64);
        let experts = l["experts"].as_array().unwrap();
        let want = if i < 8 { 1..=8 } else { 2..=2 };
        assert!(want.contains(&experts.len()), "{l}");
    }
    // A trace that cannot be written is named.
    let err = Engine::open(
        &dir,
        EngineOptions {
            expert_trace: Some(tmp.path().join("no/such/dir/t.jsonl")),
            ..options(1 << 30, true)
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("t.jsonl") && err.contains("expert trace"),
        "{err}"
    );
}

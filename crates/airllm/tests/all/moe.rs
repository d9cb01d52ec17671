//! Mixture-of-experts streaming: only routed experts are read, the expert cache keeps hot ones
//! within the budget, and every budget computes the same tokens.

use crate::common;

use crate::common::{fixtures, reference};
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, LogitsFor, ModelInfo};

const MOE: &[&str] = &[
    "mixtral-moe",
    "qwen2moe-shared-expert",
    "qwen3moe-dense-layer",
];

/// Options for decoding one sequence of up to 64 tokens at `budget`.
fn single(budget: u64) -> EngineOptions {
    EngineOptions {
        max_memory: Some(budget),
        context: 64,
        max_batch: 1,
        max_step_tokens: 64,
        max_logit_rows: 1,
        ..Default::default()
    }
}

#[test]
fn a_cold_step_reads_attention_router_and_only_the_routed_experts() {
    for name in MOE {
        let dir = fixtures().join(name);
        let info = ModelInfo::open(&dir).unwrap();
        let moe = info.cfg.moe.clone().unwrap();
        let sparse = moe.sparse.iter().filter(|&&s| s).count() as u64;
        let dense_bytes = info.sizes.layer_file_bytes;
        let expert = info.sizes.expert_file_bytes;
        let head = info.sizes.head_file_bytes;
        let min = common::minimum(&info, &single(1));
        let mut e = Engine::from_info(info, single(min)).unwrap();
        let p = e.plan().clone();
        assert_eq!(p.expert_slots, 2, "{name}: {p}");
        assert_eq!(
            (p.resident_layers, p.head_resident),
            (0, false),
            "{name}: {p}"
        );
        assert!(p.total_bytes() <= min, "{name}: {p}");
        let r = reference(name);
        let mut seq = e.new_sequence().unwrap();
        e.step(&mut [(&mut seq, &r.prompt_ids[0][..])], LogitsFor::Last)
            .unwrap();
        // Decode steps, one token each: every streamed byte is attention, router, shared
        // expert, head, or an expert routing picked.
        for t in 0..6u32 {
            let (read0, stats0) = (e.bytes_read(), e.expert_stats().unwrap());
            e.step(&mut [(&mut seq, &[t + 5][..])], LogitsFor::Last)
                .unwrap();
            let read = e.bytes_read() - read0;
            let s = e.expert_stats().unwrap().since(&stats0);
            assert_eq!(
                s.hits + s.misses,
                moe.top_k as u64 * sparse,
                "{name}: each sparse layer uses top-k experts"
            );
            let bound =
                p.streamed_layers as u64 * dense_bytes + head + moe.top_k as u64 * sparse * expert;
            assert!(
                read as f64 <= 1.1 * bound as f64,
                "{name}: read {read} bytes in a step, bound {bound}"
            );
            assert_eq!(s.bytes_read, s.misses * expert, "{name}");
            // Well short of reading every expert (top-2 of 4 at the most).
            let all = p.streamed_layers as u64 * dense_bytes
                + head
                + sparse * moe.experts as u64 * expert;
            assert!(read * 4 < all * 3, "{name}: read {read} of {all}");
        }
        assert!(e.ledger().peak() <= min, "{name}: peak over the budget");
    }
}

#[test]
fn the_cache_keeps_hot_experts_and_every_budget_gives_the_same_tokens() {
    for name in MOE {
        let dir = fixtures().join(name);
        let r = reference(name);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let info = ModelInfo::open(&dir).unwrap();
        let total = info.sizes.experts_total;
        let min = common::minimum(&info, &single(1));
        // Room for about half the experts besides the two working slots.
        let mid = min + (total as u64 / 2) * info.sizes.expert_bytes + 4 * info.sizes.layer_bytes;
        let mut outs = Vec::new();
        let mut rates = Vec::new();
        for budget in [min, mid, 1 << 30] {
            let mut e = Engine::open(&dir, single(budget)).unwrap();
            let slots = e.plan().expert_slots;
            let got = common::greedy(&mut e, &tok, &r.prompt_ids[..1], 16);
            assert_eq!(got[0], r.greedy[0], "{name}: budget {budget}");
            assert!(e.ledger().peak() <= budget, "{name}: peak over {budget}");
            let s = e.expert_stats().unwrap();
            if slots == total {
                // Everything fits: the experts were read at open, never again.
                assert_eq!(s.misses, 0, "{name}");
            }
            rates.push((slots, s.hit_rate().unwrap()));
            outs.push(got);
        }
        assert!(
            rates[0].0 < rates[1].0 && rates[1].0 < rates[2].0,
            "{name}: {rates:?}"
        );
        assert!(rates[1].1 > rates[0].1, "{name}: {rates:?}");
        assert_eq!(rates[2].1, 1.0, "{name}");
    }
}

#[test]
fn a_batch_routed_to_more_experts_than_the_cache_holds_runs_in_waves() {
    // Two prompts prefilled together route to every expert of a layer; with two slots the
    // cache computes them two at a time and still gives transformers' logits.
    let name = "qwen2moe-shared-expert";
    let dir = fixtures().join(name);
    let r = reference(name);
    let opts = EngineOptions {
        max_memory: Some(1),
        ..common::batch_options(&r.prompt_ids, 64, true)
    };
    let info = ModelInfo::open(&dir).unwrap();
    let min = common::minimum(&info, &opts);
    let mut e = Engine::from_info(
        info,
        EngineOptions {
            max_memory: Some(min),
            ..opts
        },
    )
    .unwrap();
    assert_eq!(e.plan().expert_slots, 2);
    let got = common::step_prompts(&mut e, &r.prompt_ids, LogitsFor::All);
    let s = e.expert_stats().unwrap();
    let moe = e.config().moe.clone().unwrap();
    assert_eq!(
        s.hits + s.misses,
        (moe.experts * 4) as u64,
        "every expert of 4 layers"
    );
    for (g, want) in got.iter().zip(&r.logits) {
        let g = g.to_vec2::<f32>().unwrap();
        let d = g
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "max abs logit diff {d}");
    }
}

#[test]
fn on_a_device_that_holds_every_layer_experts_pass_through_its_staging_slots() {
    // Experts stay in the host's cache, so even a device that holds all else stages them.
    let name = "mixtral-moe";
    let dir = fixtures().join(name);
    let r = reference(name);
    let plain = common::last_logits(
        &mut Engine::open(&dir, single(1 << 30)).unwrap(),
        &r.prompt_ids[..1],
    );
    let mut e = Engine::open(
        &dir,
        EngineOptions {
            device_memory: Some(1 << 30),
            ..single(1 << 30)
        },
    )
    .unwrap();
    let d = e.plan().device.clone().unwrap();
    assert_eq!(d.resident_layers, 4, "{}", e.plan());
    assert!(d.stages(), "{}", e.plan());
    let got = common::last_logits(&mut e, &r.prompt_ids[..1]);
    assert_eq!(got, plain);
    let used = e.expert_stats().unwrap().hits + e.expert_stats().unwrap().misses;
    assert_eq!(
        e.bytes_moved(),
        used * ModelInfo::open(&dir).unwrap().sizes.expert_file_bytes
    );
}

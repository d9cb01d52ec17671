//! Gated DeltaNet hybrids beyond the transformers fixtures: a multimodal release runs its
//! language model, and a sequence's recurrent states are charged beside its KV cache.

use crate::common::{self, broken, fixtures, reference};
use airllm::{Engine, EngineOptions, LogitsFor, ModelInfo};

fn options() -> EngineOptions {
    common::small_options(128, 2, 128, 128)
}

/// Qwen3.5's releases are `Qwen3_5MoeForConditionalGeneration`: the text model's config in
/// `text_config` and its weights under `model.language_model.`, beside a vision tower.
#[test]
fn a_multimodal_release_runs_its_language_model() {
    let name = "qwen3_5moe-hybrid";
    let r = reference(name);
    let (_tmp, dir) = broken::copy_fixture(name);
    broken::edit_json(&dir.join("config.json"), |c| {
        let mut text = c.clone();
        text.as_object_mut().unwrap().remove("architectures");
        text["model_type"] = serde_json::json!("qwen3_5_moe_text");
        *c = serde_json::json!({
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "model_type": "qwen3_5_moe",
            "text_config": text,
            "vision_config": {"depth": 1, "hidden_size": 8},
            "tie_word_embeddings": true,
        });
    });
    broken::edit_header(&dir.join("model.safetensors"), |h| {
        let o = h.as_object_mut().unwrap();
        let old: Vec<(String, serde_json::Value)> = std::mem::take(o).into_iter().collect();
        for (k, v) in old {
            let k = match k.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => k,
            };
            o.insert(k, v);
        }
        o.insert(
            "model.visual.patch_embed.proj.weight".into(),
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
        );
    });
    let info = ModelInfo::open(&dir).unwrap();
    assert_eq!(info.cfg.arch.hf_name(), "Qwen3_5MoeForCausalLM");
    // A config that names only its model_type is the same release.
    let (_tmp2, bare) = broken::copy_fixture(name);
    std::fs::copy(
        dir.join("model.safetensors"),
        bare.join("model.safetensors"),
    )
    .unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("architectures");
    std::fs::write(bare.join("config.json"), c.to_string()).unwrap();
    let mut bare_cfg = ModelInfo::open(&bare).unwrap().cfg;
    bare_cfg.path = info.cfg.path.clone();
    assert_eq!(format!("{bare_cfg:?}"), format!("{:?}", info.cfg));
    let mut wrapped = Engine::open(&dir, options()).unwrap();
    let mut plain = Engine::open(&fixtures().join(name), options()).unwrap();
    let a = common::step_prompts(&mut wrapped, &r.prompt_ids, LogitsFor::All);
    let b = common::step_prompts(&mut plain, &r.prompt_ids, LogitsFor::All);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.to_vec2::<f32>().unwrap(),
            y.to_vec2::<f32>().unwrap(),
            "the wrapped release computes otherwise"
        );
    }
}

/// Each sequence is charged its full-attention layers' KV cache and its linear layers' fixed
/// states; the budget a plan for two sequences asks for admits two and no third.
#[test]
fn states_are_charged_with_the_kv_cache() {
    let dir = fixtures().join("qwen3next-hybrid");
    let info = ModelInfo::open(&dir).unwrap();
    let c = &info.cfg;
    let o = options();
    let l = c.linear.as_ref().unwrap();
    let state = (l.value_heads * l.key_dim * l.value_dim + l.conv_dim() * (l.conv_kernel - 1)) * 4;
    let kv = 2 * c.num_kv_heads * c.head_dim * o.context * 4;
    assert_eq!(
        airllm::stream::plan::kv_bytes_per_seq(c, &o),
        (3 * state + kv) as u64,
        "three linear layers and one full"
    );
    // Speculation's journal adds a copy of the state and the rows it may take back.
    let spec = EngineOptions {
        rollback_rows: 8,
        ..o.clone()
    };
    assert!(
        airllm::stream::plan::state_bytes_per_seq(c, &spec)
            > 2 * airllm::stream::plan::state_bytes_per_seq(c, &o)
    );
    let min = common::minimum(
        &info,
        &EngineOptions {
            max_memory: Some(1),
            ..o.clone()
        },
    );
    let e = Engine::open(
        &dir,
        EngineOptions {
            max_memory: Some(min),
            ..o
        },
    )
    .unwrap();
    let a = e.new_sequence().unwrap();
    let b = e.new_sequence().unwrap();
    assert!(matches!(e.new_sequence(), Err(airllm::Error::NoRoom(_))));
    drop((a, b));
}

/// A chat turn continues from the recurrent state the last turn left, as it does from a KV
/// cache; a turn whose prompt leaves the cached tokens earlier starts over (a linear layer
/// cannot go back), and both give what a fresh run of the whole prompt gives.
#[test]
fn a_conversation_continues_from_its_state() {
    use airllm::generate::{GenerationParams, Request, Scheduler};
    let name = "qwen3next-hybrid";
    let r = reference(name);
    let dir = fixtures().join(name);
    let mut e = Engine::open(&dir, options()).unwrap();
    let mut sched = Scheduler::new();
    let p = GenerationParams {
        max_new_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let turn = |e: &mut Engine, s: &mut Scheduler, prompt: &[u32], resume| {
        let req = Request {
            resume,
            ..Request::new(prompt.to_vec(), p.clone())
        };
        s.run(e, None, vec![req], |_| Ok(())).unwrap().remove(0)
    };
    let first = r.prompt_ids[1].clone();
    let (c1, caches) = turn(&mut e, &mut sched, &first, None);
    let mut next: Vec<u32> = first.iter().chain(&c1.token_ids).copied().collect();
    next.extend(&r.prompt_ids[0][..10]);
    let fresh = turn(&mut e, &mut sched, &next, None).0.token_ids;
    // Every token but the last sampled one is in the state.
    let held = first.len() + c1.token_ids.len() - 1;
    let mut seq = caches.seq;
    assert_eq!(seq.len(), held);
    // What the scheduler asks of a resumed sequence: it keeps all it holds.
    assert_eq!(seq.truncate(held), held);
    let (c2, caches) = turn(&mut e, &mut sched, &next, Some((seq, held)));
    assert_eq!(c2.token_ids, fresh, "continued from the state");
    assert_eq!(caches.seq.len(), next.len() + 3);
    // A prompt that differs inside the cached tokens: the state starts over.
    let (c3, _) = turn(&mut e, &mut sched, &next, Some((caches.seq, 5)));
    assert_eq!(c3.token_ids, fresh, "started over");
}

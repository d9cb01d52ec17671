//! Latent attention keeps only the latent: a DeepSeek sequence's KV cache is
//! `(kv_lora_rank + qk_rope_head_dim)` f32 values per token and layer, as allocated, as
//! planned and as charged, in transformers' form and in llama.cpp's GGUF forms alike; and the
//! engine running in that form gives transformers' logits (which transformers computes from
//! expanded keys and values) in `reference.rs` and `gguf_tiny.rs`.

use crate::common;
use airllm::{Engine, EngineOptions, ModelInfo};

#[test]
fn the_kv_cache_holds_the_latent_and_nothing_else() {
    let models = [
        common::fixture("hf/deepseek-v2-mla-grouped"),
        common::fixture("hf/deepseek-v3-mla-noaux-yarn"),
        common::fixture("hf/deepseek-v2-lite-27l"),
        common::fixture("gguf/tiny/deepseek2-v3-f32.gguf"),
        common::fixture("gguf/tiny/deepseek2-lite-f32.gguf"),
    ];
    for path in models {
        let info = ModelInfo::open(&path).unwrap();
        let c = info.cfg.clone();
        let m = c.mla.clone().expect("a latent attention model");
        let context = 80;
        let per_token = ((m.kv_lora_rank + m.qk_rope_head_dim) * c.num_layers * 4) as u64;
        assert_eq!(
            c.kv_values_per_token() * 4 * c.num_layers,
            per_token as usize,
            "{path:?}"
        );
        let opts = EngineOptions {
            context,
            ..Default::default()
        };
        let plan = info.plan(&opts).unwrap();
        assert_eq!(
            plan.kv_bytes,
            per_token * context as u64,
            "{path:?}: planned"
        );
        let engine = Engine::from_info(info, opts).unwrap();
        let held = engine.ledger().held();
        let seq = engine.new_sequence().unwrap();
        assert_eq!(
            seq.kv_bytes(),
            per_token * context as u64,
            "{path:?}: allocated"
        );
        assert_eq!(
            engine.ledger().held() - held,
            per_token * context as u64,
            "{path:?}: charged"
        );
    }
}

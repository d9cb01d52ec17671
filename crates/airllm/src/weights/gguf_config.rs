//! The model config of a GGUF file, read from its metadata through the one GGUF vocabulary
//! ([`super::gguf_keys`]) and the layer schema's tensor names. It lives here, not in the config
//! module, so that the config module depends on no weight format.

use crate::config::{
    Activation, Arch, BlockSpec, ModelConfig, MoeSpec, MoeStyle, RopeConfig, RopeScaling, Routing,
};
use crate::error::{Error, Result};
use crate::weights::gguf::{GgufMeta, Value as V};
use crate::weights::gguf_keys::{self as keys, Key};
use crate::weights::schema::{gguf_name, Naming, Role};

impl ModelConfig {
    /// The config of a GGUF file, from its `{arch}.*` metadata, mapped onto the same fields as
    /// a Hugging Face config so the same block runs it. Mistral files use the `llama` keys.
    pub fn from_gguf(g: &dyn GgufMeta) -> Result<Self> {
        let path = g.path();
        let a = g
            .get(keys::ARCHITECTURE)
            .and_then(V::as_str)
            .ok_or_else(|| Error::config(path, keys::ARCHITECTURE, "required metadata is missing"))?
            .to_string();
        let key = |k: Key| k.of(&a);
        let has_experts = g
            .get(&key(Key::ExpertCount))
            .and_then(V::as_u64)
            .is_some_and(|n| n > 0);
        let arch = keys::arch_of(&a, has_experts).ok_or_else(|| Error::UnknownArch {
            path: path.to_path_buf(),
            arch: a.clone(),
            supported: keys::supported_archs(),
        })?;
        let req = |k: Key| -> Result<usize> {
            let full = key(k);
            match g.get(&full).and_then(V::as_u64) {
                Some(0) => Err(Error::config(path, &full, "must be at least 1")),
                Some(n) => Ok(n as usize),
                None => Err(Error::config(
                    path,
                    &full,
                    "required metadata is missing or not an integer",
                )),
            }
        };
        let opt_u = |k: Key| g.get(&key(k)).and_then(V::as_u64).map(|n| n as usize);
        let opt_f = |k: Key| g.get(&key(k)).and_then(V::as_f64);
        let hidden_size = req(Key::EmbeddingLength)?;
        let num_layers = req(Key::BlockCount)?;
        let intermediate_size = req(Key::FeedForwardLength)?;
        let num_heads = req(Key::HeadCount)?;
        let num_kv_heads = opt_u(Key::HeadCountKv).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                &key(Key::HeadCountKv),
                format!("{num_kv_heads} does not divide head_count {num_heads}"),
            ));
        }
        let head_dim = opt_u(Key::KeyLength).unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 == 1 {
            return Err(Error::config(
                path,
                &key(Key::KeyLength),
                format!("{head_dim} must be even and positive"),
            ));
        }
        let count = g.get(keys::TOKEN_COUNT).and_then(V::as_u64);
        let vocab_size = match g
            .get(keys::TOKENS)
            .and_then(V::as_array)
            .map(|t| t.len() as u64)
            .or(count)
        {
            Some(t) => t as usize,
            None => match opt_u(Key::VocabSize) {
                Some(n) => n,
                None => match g.tensor_shape(Naming::Gguf.embed()) {
                    Some(t) => t[0],
                    None => {
                        return Err(Error::config(
                            path,
                            keys::TOKENS,
                            "required metadata is missing",
                        ))
                    }
                },
            },
        };
        let rms_norm_eps = opt_f(Key::LayerNormRmsEpsilon).ok_or_else(|| {
            Error::config(
                path,
                &key(Key::LayerNormRmsEpsilon),
                "required metadata is missing",
            )
        })?;
        let theta = opt_f(Key::RopeFreqBase).unwrap_or(10000.0) as f32;
        let scaling = match g.get(&key(Key::RopeScalingType)).and_then(V::as_str) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: opt_f(Key::RopeScalingFactor).unwrap_or(1.0) as f32,
            },
            Some(other) => {
                return Err(Error::config(
                    path,
                    &key(Key::RopeScalingType),
                    format!("`{other}` is not supported"),
                ))
            }
        };
        // LongRoPE's factors are tensors (read when the model opens); the rest is metadata.
        let scaling = if g.tensor_shape(Naming::GGUF_ROPE_FACTORS_LONG).is_some() {
            RopeScaling::LongRope {
                short_factor: vec![],
                long_factor: vec![],
                original_max_position_embeddings: opt_u(Key::RopeScalingOriginalContextLength)
                    .or(opt_u(Key::ContextLength))
                    .unwrap_or(4096),
                attention_factor: opt_f(Key::RopeScalingAttnFactor).unwrap_or(1.0) as f32,
            }
        } else {
            scaling
        };
        let rope = RopeConfig { theta, scaling };
        let rotary_dim = opt_u(Key::RopeDimensionCount).unwrap_or(head_dim);
        if rotary_dim == 0 || rotary_dim % 2 == 1 || rotary_dim > head_dim {
            return Err(Error::config(
                path,
                &key(Key::RopeDimensionCount),
                format!("{rotary_dim} must be even, positive and at most the head's {head_dim}"),
            ));
        }
        let mut block = BlockSpec::plain();
        let window = opt_u(Key::SlidingWindow).filter(|&w| w > 0);
        let mut layer_windows = vec![None; num_layers];
        let mut rope_local = None;
        let mut attn_scale = 1.0 / (head_dim as f64).sqrt();
        match arch {
            Arch::Llama | Arch::Mistral | Arch::Mixtral => {
                // llama.cpp's converter permutes q/k so that RoPE rotates adjacent pairs.
                block.rope_interleaved = true;
                layer_windows = vec![window; num_layers];
            }
            // llama.cpp runs Phi-3 without its sliding window.
            Arch::Phi3 => {
                block.fused_qkv = true;
                block.fused_gate_up = true;
            }
            Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4 | Arch::Glm4Moe => {
                return Err(Error::UnknownArch {
                    path: path.to_path_buf(),
                    arch: a.clone(),
                    supported: keys::supported_archs(),
                })
            }
            Arch::Qwen2 | Arch::Qwen2Moe => block.qkv_bias = true,
            Arch::Qwen3 | Arch::Qwen3Moe => block.qk_norm = true,
            Arch::Gemma2 => {
                block.sandwich_norms = true;
                block.act = Activation::GeluTanhF16;
                // As llama.cpp: sliding and global layers alternate, the first sliding.
                if let Some(w) = window {
                    layer_windows = (0..num_layers).map(|i| (i % 2 == 0).then_some(w)).collect();
                }
                // llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model
                // (46 layers), which uses hidden/heads.
                if num_layers == 46 {
                    attn_scale = 1.0 / ((hidden_size / num_heads) as f64).sqrt();
                }
            }
            Arch::Gemma3 => {
                block.qk_norm = true;
                block.sandwich_norms = true;
                block.act = Activation::GeluTanhF16;
                if let Some(w) = window {
                    // As llama.cpp: a pattern array, or every n-th layer global (default 6).
                    let pattern = g.get(&key(Key::SlidingWindowPattern));
                    layer_windows = match pattern {
                        Some(V::Array(flags)) if flags.len() == num_layers => flags
                            .iter()
                            .map(|f| f.as_bool().unwrap_or(false).then_some(w))
                            .collect(),
                        other => {
                            let n = other.and_then(V::as_u64).unwrap_or(6) as usize;
                            (0..num_layers)
                                .map(|i| (n == 0 || i % n < n - 1).then_some(w))
                                .collect()
                        }
                    };
                    rope_local = Some(RopeConfig {
                        theta: opt_f(Key::RopeFreqBaseSwa).unwrap_or(10000.0) as f32,
                        scaling: RopeScaling::None,
                    });
                }
                // llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model
                // (62 layers), which uses hidden/heads.
                if num_layers == 62 {
                    attn_scale = 1.0 / ((hidden_size / num_heads) as f64).sqrt();
                }
            }
        }
        // An explicit scale (llama.cpp's `attention.scale`, written by our converter for models
        // whose scale is not the architecture's default) wins.
        if let Some(s) = opt_f(Key::AttentionScale).filter(|&s| s > 0.0) {
            attn_scale = s;
        }
        // Biases are optional tensors in llama.cpp; their presence is the flag.
        let has = |r: Role| g.tensor_shape(&gguf_name(0, r)).is_some();
        block.qkv_bias |= has(Role::QBias);
        block.o_bias |= has(Role::OBias);
        block.mlp_bias |= has(Role::UpBias);
        let tokens = |k: &str| g.get(k).and_then(V::as_u64).map(|n| n as u32);
        let moe = match arch {
            Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let experts = req(Key::ExpertCount)?;
                let top_k = req(Key::ExpertUsedCount)?;
                if top_k > experts {
                    return Err(Error::config(
                        path,
                        &key(Key::ExpertUsedCount),
                        format!("{top_k} is more than the {experts} experts"),
                    ));
                }
                let expert_size = if arch == Arch::Mixtral {
                    intermediate_size
                } else {
                    req(Key::ExpertFeedForwardLength)?
                };
                // A layer is sparse when it has a router (llama.cpp's own test).
                let sparse = (0..num_layers)
                    .map(|l| g.tensor_shape(&gguf_name(l, Role::Router)).is_some())
                    .collect();
                // As llama.cpp: Qwen2-MoE leaves the top-k weights as they are, the others
                // renormalize them, unless the file says otherwise.
                let norm_default = arch != Arch::Qwen2Moe;
                let norm_topk = match g.get(&key(Key::ExpertWeightsNorm)) {
                    Some(V::Bool(b)) => *b,
                    _ => norm_default,
                };
                Some(MoeSpec {
                    style: if arch == Arch::Mixtral {
                        MoeStyle::Mixtral
                    } else {
                        MoeStyle::Qwen
                    },
                    experts,
                    top_k,
                    expert_size,
                    norm_topk,
                    shared_size: opt_u(Key::ExpertSharedFeedForwardLength).filter(|&n| n > 0),
                    shared_gated: arch == Arch::Qwen2Moe,
                    sparse,
                    routing: Routing::softmax(),
                })
            }
            _ => None,
        };
        Ok(ModelConfig {
            path: path.to_path_buf(),
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope,
            max_position_embeddings: opt_u(Key::ContextLength).unwrap_or(4096),
            tie_word_embeddings: g.tensor_shape(Naming::Gguf.head()).is_none(),
            layer_windows,
            block,
            declared_dtype: g
                .get(keys::FILE_TYPE)
                .and_then(V::as_u64)
                .map(|t| format!("gguf file_type {t}")),
            bos_token_id: tokens(keys::BOS_TOKEN_ID),
            eos_token_ids: tokens(keys::EOS_TOKEN_ID).into_iter().collect(),
            attn_scale,
            embed_scale: arch.is_gemma().then(|| (hidden_size as f64).sqrt()),
            rope_local,
            final_logit_softcap: opt_f(Key::FinalLogitSoftcapping).filter(|&c| c > 0.0),
            attn_logit_softcap: opt_f(Key::AttnLogitSoftcapping).filter(|&c| c > 0.0),
            moe,
            rotary_dim,
            mla: None,
            fp8: None,
        })
    }
}

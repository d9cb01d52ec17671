//! The model config of a GGUF file, read from its metadata through the one GGUF vocabulary
//! ([`super::gguf_keys`]) and the layer schema's tensor names. It lives here, not in the config
//! module, so that the config module depends on no weight format.

use crate::config::{
    group_fault, yarn_mscale, Activation, Arch, BlockSpec, ClampedSwiglu, ExpertGroups, GroupFault,
    MlaSpec, ModelConfig, MoeSpec, MoeStyle, RopeConfig, RopeScaling, Routing, Scoring,
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
        // `deepseek2` is V3 when it routes by sigmoid (llama.cpp's gating function 2).
        let sigmoid = match g.get(&key(Key::ExpertGatingFunc)).and_then(V::as_u64) {
            // GPT-OSS's gating (llama.cpp's 3, softmax over the chosen) is the architecture's.
            _ if arch == Arch::GptOss => false,
            Some(2) => true,
            Some(0) | None => arch == Arch::Glm4Moe,
            Some(1) => false,
            Some(other) => {
                return Err(Error::config(
                    path,
                    &key(Key::ExpertGatingFunc),
                    format!("{other} is not supported (supported: 1 softmax, 2 sigmoid)"),
                ))
            }
        };
        let arch = if arch == Arch::DeepseekV2 && sigmoid {
            Arch::DeepseekV3
        } else {
            arch
        };
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
        // Multi-token-prediction layers (GLM-4.5) follow the trunk in `block_count`; they are
        // not run.
        let num_layers = req(Key::BlockCount)?;
        let nextn = opt_u(Key::NextnPredictLayers).unwrap_or(0);
        if nextn >= num_layers {
            return Err(Error::config(
                path,
                &key(Key::NextnPredictLayers),
                format!("{nextn} leaves none of the {num_layers} blocks to run"),
            ));
        }
        let num_layers = num_layers - nextn;
        let intermediate_size = req(Key::FeedForwardLength)?;
        let num_heads = req(Key::HeadCount)?;
        let mut num_kv_heads = opt_u(Key::HeadCountKv).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                &key(Key::HeadCountKv),
                format!("{num_kv_heads} does not divide head_count {num_heads}"),
            ));
        }
        let mut head_dim = opt_u(Key::KeyLength).unwrap_or(hidden_size / num_heads);
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
            Some("yarn") => {
                let factor = opt_f(Key::RopeScalingFactor).unwrap_or(1.0) as f32;
                let original = opt_u(Key::RopeScalingOriginalContextLength).ok_or_else(|| {
                    Error::config(
                        path,
                        &key(Key::RopeScalingOriginalContextLength),
                        "required by YaRN scaling",
                    )
                })?;
                let all = opt_f(Key::RopeScalingYarnLogMul).map(|m| m / 0.1);
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: opt_f(Key::RopeScalingYarnBetaFast).unwrap_or(32.0),
                    beta_slow: opt_f(Key::RopeScalingYarnBetaSlow).unwrap_or(1.0),
                    // As llama.cpp: DeepSeek's cos/sin are left as they are (its scale goes
                    // into the softmax); otherwise YaRN's mscale(factor).
                    attention_factor: if all.is_some() {
                        1.0
                    } else {
                        yarn_mscale(factor as f64, 1.0) as f32
                    } * opt_f(Key::RopeScalingAttnFactor).unwrap_or(1.0) as f32,
                    // llama.cpp always rounds the correction band to whole dimensions, also
                    // for GPT-OSS, whose definition does not (`truncate: false`); a GGUF
                    // file computes llama.cpp's function (tests/all/gguf_tiny.rs).
                    truncate: true,
                    mscale_all_dim: all,
                }
            }
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
        let mut mla = None;
        match arch {
            // Gated DeltaNet's GGUF form is not read yet. llama.cpp's converter (0.3.36) writes
            // A_log as ssm_a = -exp(A_log), dt_bias as ssm_dt.bias, the conv squeezed, +1 baked
            // into every RMSNorm but ssm_norm; Qwen3-Next's qkvz split into attn_qkv and
            // attn_gate (ssm_ba stays fused per key head); Qwen3.5's value heads reordered from
            // grouped to tiled (value head h under key head h mod key_heads).
            Arch::Qwen3Next | Arch::Qwen35Moe | Arch::Qwen35 => {
                return Err(Error::file(
                    path,
                    format!("{} in GGUF is not supported yet", arch.hf_name()),
                ))
            }
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
            Arch::DeepseekV2 | Arch::DeepseekV3 => {
                let m = read_mla(g, &a, rotary_dim, rms_norm_eps)?;
                // llama.cpp's converter writes the absorbed form's shapes (one KV head of the
                // latent's width); the config keeps the model's heads, as transformers has it.
                num_kv_heads = num_heads;
                head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim;
                block.mla = true;
                block.q_lora = m.q_lora_rank.is_some();
                block.kv_b_split = g.tensor_shape(&gguf_name(0, Role::KB)).is_some();
                // llama.cpp's NORM rope: adjacent pairs, as DeepSeek's `rope_interleave`.
                block.rope_interleaved = true;
                attn_scale = 1.0 / (head_dim as f64).sqrt();
                // YaRN: llama.cpp takes DeepSeek's `mscale` equal to `mscale_all_dim`, so
                // cos/sin are not rescaled and the softmax scale gains mscale(all)².
                if let RopeScaling::Yarn {
                    factor,
                    mscale_all_dim: Some(all),
                    ..
                } = rope.scaling
                {
                    let ms = yarn_mscale(factor as f64, all);
                    attn_scale *= ms * ms;
                }
                mla = Some(m);
            }
            // GLM-4 rotates adjacent pairs (llama.cpp's NORM rope), GLM-4.5 the halves.
            Arch::Glm4 => {
                block.fused_gate_up = true;
                block.sandwich_norms = true;
                block.glm_norms = true;
                block.rope_interleaved = true;
            }
            Arch::Glm4Moe => {
                block.qk_norm = has_tensor(g, 0, Role::QNorm);
                block.mlp_norm_post_attention = true;
            }
            // GPT-OSS: sinks, llama.cpp's `post_attention_norm` before the MLP, separate gate
            // and up stacks, and sliding layers every other one from the first (a pattern
            // array, or every n-th layer global, as llama.cpp reads it).
            Arch::GptOss => {
                block.sinks = true;
                block.mlp_norm_post_attention = true;
                if let Some(w) = window {
                    layer_windows = swa_pattern(g, &a, num_layers, w, 2);
                }
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
                    layer_windows = swa_pattern(g, &a, num_layers, w, 6);
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
            Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => {
                read_deepseek_moe(g, &a, num_layers, intermediate_size, sigmoid)?
            }
            Arch::GptOss => {
                let experts = req(Key::ExpertCount)?;
                let top_k = req(Key::ExpertUsedCount)?;
                if top_k > experts {
                    return Err(Error::config(
                        path,
                        &key(Key::ExpertUsedCount),
                        format!("{top_k} is more than the {experts} experts"),
                    ));
                }
                // llama.cpp's constants for this architecture (GGUF has no keys for them).
                let clamp = ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0,
                };
                let size = req(Key::ExpertFeedForwardLength)?;
                Some(MoeSpec::gpt_oss(experts, top_k, size, num_layers, clamp))
            }
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
                    clamped: None,
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
            rotary_dim: mla.as_ref().map_or(rotary_dim, |m| m.qk_rope_head_dim),
            mla,
            fp8: None,
            linear: None,
        })
    }
}

/// Whether layer `layer` of the file has the tensor of `role`.
fn has_tensor(g: &dyn GgufMeta, layer: usize, role: Role) -> bool {
    g.tensor_shape(&gguf_name(layer, role)).is_some()
}

/// Latent attention's shapes from llama.cpp's keys: `key_length_mla`/`value_length_mla` in
/// current files (whose `key_length` is the latent's), `key_length`/`value_length` in older
/// ones. The RoPE part is `rope.dimension_count`.
fn read_mla(g: &dyn GgufMeta, a: &str, rope: usize, eps: f64) -> Result<MlaSpec> {
    let path = g.path();
    let u = |k: Key| g.get(&k.of(a)).and_then(V::as_u64).map(|n| n as usize);
    let need = |k: Key| -> Result<usize> {
        u(k).filter(|&n| n > 0).ok_or_else(|| {
            Error::config(
                path,
                &k.of(a),
                "required metadata is missing or zero (latent attention)",
            )
        })
    };
    let (k_key, v_key) = if u(Key::KeyLengthMla).is_some() {
        (Key::KeyLengthMla, Key::ValueLengthMla)
    } else {
        (Key::KeyLength, Key::ValueLength)
    };
    let head_k = need(k_key)?;
    if head_k <= rope {
        return Err(Error::config(
            path,
            &k_key.of(a),
            format!("{head_k} leaves no room beside the {rope} RoPE dimensions"),
        ));
    }
    Ok(MlaSpec {
        q_lora_rank: u(Key::QLoraRank).filter(|&n| n > 0),
        kv_lora_rank: need(Key::KvLoraRank)?,
        qk_nope_head_dim: head_k - rope,
        qk_rope_head_dim: rope,
        v_head_dim: need(v_key)?,
        norm_eps: eps,
    })
}

/// DeepSeek's (and GLM-4.5's) routing from llama.cpp's keys. Sparse layers are those with a
/// router; the correction bias is present or not as a tensor. Groups are scored by their two
/// best experts for sigmoid routing (V3's `noaux_tc`, as llama.cpp does), by their best one
/// for softmax routing (V2's `group_limited_greedy`, where llama.cpp also takes two).
fn read_deepseek_moe(
    g: &dyn GgufMeta,
    a: &str,
    num_layers: usize,
    intermediate_size: usize,
    sigmoid: bool,
) -> Result<Option<MoeSpec>> {
    let path = g.path();
    let key = |k: Key| k.of(a);
    let u = |k: Key| g.get(&key(k)).and_then(V::as_u64).map(|n| n as usize);
    let Some(experts) = u(Key::ExpertCount).filter(|&n| n > 0) else {
        return Ok(None);
    };
    let top_k = u(Key::ExpertUsedCount).unwrap_or(0);
    if top_k == 0 || top_k > experts {
        return Err(Error::config(
            path,
            &key(Key::ExpertUsedCount),
            format!("{top_k} must be between 1 and the {experts} experts"),
        ));
    }
    let expert_size = u(Key::ExpertFeedForwardLength)
        .filter(|&n| n > 0)
        .unwrap_or(intermediate_size);
    let sparse: Vec<bool> = (0..num_layers)
        .map(|l| has_tensor(g, l, Role::Router))
        .collect();
    let first = sparse.iter().position(|&s| s);
    let correction_bias = first.is_some_and(|l| has_tensor(g, l, Role::RouterBias));
    let groups = u(Key::ExpertGroupCount).unwrap_or(1).max(1);
    let groups = if groups > 1 {
        let top_groups = u(Key::ExpertGroupUsedCount).unwrap_or(groups);
        if let Some((fault, why)) = group_fault(experts, groups, top_groups, top_k) {
            let k = match fault {
                GroupFault::Groups => Key::ExpertGroupCount,
                GroupFault::TopGroups => Key::ExpertGroupUsedCount,
                GroupFault::TopK => Key::ExpertUsedCount,
            };
            return Err(Error::config(path, &key(k), why));
        }
        Some(ExpertGroups {
            groups,
            top_groups,
            top2_sum: sigmoid,
        })
    } else {
        None
    };
    let shared = u(Key::ExpertSharedCount).unwrap_or(0);
    let norm_topk = matches!(g.get(&key(Key::ExpertWeightsNorm)), Some(V::Bool(true)));
    let scale = g
        .get(&key(Key::ExpertWeightsScale))
        .and_then(V::as_f64)
        .filter(|&s| s > 0.0)
        .unwrap_or(1.0) as f32;
    Ok(Some(MoeSpec {
        style: MoeStyle::Deepseek,
        experts,
        top_k,
        expert_size,
        norm_topk,
        shared_size: (shared > 0).then_some(shared * expert_size),
        shared_gated: false,
        sparse,
        routing: Routing {
            scoring: if sigmoid {
                Scoring::Sigmoid
            } else {
                Scoring::Softmax
            },
            correction_bias,
            groups,
            scale,
        },
        clamped: None,
    }))
}

/// Which layers slide, as llama.cpp reads it: `sliding_window_pattern` as one flag per layer,
/// or as n (every n-th layer global), else every `default`-th layer global.
fn swa_pattern(
    g: &dyn GgufMeta,
    arch: &str,
    num_layers: usize,
    w: usize,
    default: u64,
) -> Vec<Option<usize>> {
    match g.get(&Key::SlidingWindowPattern.of(arch)) {
        Some(V::Array(flags)) if flags.len() == num_layers => flags
            .iter()
            .map(|f| f.as_bool().unwrap_or(false).then_some(w))
            .collect(),
        other => {
            let n = other.and_then(V::as_u64).unwrap_or(default) as usize;
            (0..num_layers)
                .map(|i| (n == 0 || i % n < n - 1).then_some(w))
                .collect()
        }
    }
}

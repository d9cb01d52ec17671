//! Synthetic models: random weights in the exact layout of a Hugging Face checkpoint, so memory
//! and speed can be measured on 7B–70B shapes without downloading anything.
//!
//! Values are a pure function of the seed and the tensor's name, so a model is reproducible
//! whatever order or sharding it is written in. Output goes to a temporary folder that is renamed
//! into place only when complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::json;

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::safetensors::DType;
use crate::weights::schema::{Kind, LayerSchema, Naming};

#[derive(Debug, Clone)]
pub struct SynthShape {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub tie: bool,
    /// When not hidden / heads (Qwen3-MoE).
    pub head_dim: Option<usize>,
    pub moe: Option<SynthMoe>,
    /// More `config.json` keys in transformers' terms (latent attention, routing groups,
    /// dense first layers, RoPE scaling), merged over the rest.
    pub extra: serde_json::Value,
    /// How a mixture's routers and embeddings relate (random weights by default).
    pub routing: SynthRouting,
}

/// A stand-in for real routing, since no real mixture's weights can be fetched here.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SynthRouting {
    /// Every weight independent: consecutive layers route unrelatedly, and a guess of the next
    /// layer's experts is right about top-k / experts of the time.
    #[default]
    Random,
    /// The routers of all layers share one direction per expert (each router row is mostly
    /// that direction), and each token's embedding carries a component of `strength` along
    /// a few of them, so the hidden state keeps choosing alike from layer to layer, as real
    /// models' do: with the default strength, guessing the next layer's experts from the
    /// current hidden state is right about 97% of the time on the Mixtral shape, the figure
    /// Fate (arXiv 2502.12224) reports for real models.
    Correlated { strength: f32 },
}

/// The default strength of [`SynthRouting::Correlated`].
pub const CORRELATED_STRENGTH: f32 = 2.5;

/// The experts of a mixture-of-experts shape.
#[derive(Debug, Clone)]
pub struct SynthMoe {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's width (Mixtral's is `intermediate`).
    pub expert_size: usize,
}

/// Named shapes of well-known models.
pub fn preset(name: &str) -> Option<SynthShape> {
    let s = |arch, hidden, intermediate, layers, heads, kv_heads, vocab, rope_theta| SynthShape {
        routing: SynthRouting::Random,
        arch,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        vocab,
        rope_theta,
        tie: false,
        head_dim: None,
        moe: None,
        extra: serde_json::Value::Null,
    };
    let moe = |experts, top_k, expert_size| {
        Some(SynthMoe {
            experts,
            top_k,
            expert_size,
        })
    };
    Some(match name {
        "llama-7b" => s(Arch::Llama, 4096, 11008, 32, 32, 32, 32000, 10000.0),
        "llama-13b" => s(Arch::Llama, 5120, 13824, 40, 40, 40, 32000, 10000.0),
        "mistral-7b" => s(Arch::Mistral, 4096, 14336, 32, 32, 8, 32000, 1e6),
        "qwen2-7b" => s(Arch::Qwen2, 3584, 18944, 28, 28, 4, 152064, 1e6),
        "llama-70b" => s(Arch::Llama, 8192, 28672, 80, 64, 8, 128256, 500000.0),
        "tiny" => s(Arch::Llama, 256, 688, 8, 8, 4, 512, 10000.0),
        "mixtral-8x7b" => SynthShape {
            moe: Some(SynthMoe {
                experts: 8,
                top_k: 2,
                expert_size: 14336,
            }),
            ..s(Arch::Mixtral, 4096, 14336, 32, 32, 8, 32000, 1e6)
        },
        "qwen3-30b-a3b" => SynthShape {
            head_dim: Some(128),
            moe: Some(SynthMoe {
                experts: 128,
                top_k: 8,
                expert_size: 768,
            }),
            ..s(Arch::Qwen3Moe, 2048, 6144, 48, 32, 4, 151936, 1e6)
        },
        "tiny-moe" => SynthShape {
            moe: Some(SynthMoe {
                experts: 8,
                top_k: 2,
                expert_size: 512,
            }),
            ..s(Arch::Mixtral, 256, 512, 4, 8, 4, 512, 1e6)
        },
        // DeepSeek-V3/R1 (671B): latent attention, 3 dense layers, 256 experts in 8 groups.
        "deepseek-v3" => SynthShape {
            moe: moe(256, 8, 2048),
            extra: json!({"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 1,
                "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
                "routed_scaling_factor": 2.5, "max_position_embeddings": 163840,
                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}),
            ..s(Arch::DeepseekV3, 7168, 18432, 61, 128, 128, 129280, 10000.0)
        },
        // Kimi K2 (1T): DeepSeek-V3's architecture with 384 experts, 64 heads, one group.
        "kimi-k2" => SynthShape {
            moe: moe(384, 8, 2048),
            extra: json!({"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 1,
                "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
                "routed_scaling_factor": 2.827, "max_position_embeddings": 131072,
                "rope_scaling": {"type": "yarn", "factor": 32, "original_max_position_embeddings": 4096,
                    "beta_fast": 1, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}),
            ..s(Arch::DeepseekV3, 7168, 18432, 61, 64, 64, 163840, 50000.0)
        },
        // DeepSeek-V2-Lite (16B): no query bottleneck, softmax routing over 64 experts.
        "deepseek-v2-lite" => SynthShape {
            moe: moe(64, 6, 1408),
            extra: json!({"q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 2,
                "first_k_dense_replace": 1, "topk_method": "greedy", "scoring_func": "softmax",
                "norm_topk_prob": false, "routed_scaling_factor": 1.0,
                "max_position_embeddings": 163840,
                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}),
            ..s(Arch::DeepseekV2, 2048, 10944, 27, 16, 16, 102400, 10000.0)
        },
        // GLM-4.5-Air (106B) and GLM-4.5 (355B).
        "glm-4.5-air" => SynthShape {
            head_dim: Some(128),
            moe: moe(128, 8, 1408),
            extra: json!({"partial_rotary_factor": 0.5, "attention_bias": true, "use_qk_norm": false,
                "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                "norm_topk_prob": true, "routed_scaling_factor": 1.0}),
            ..s(Arch::Glm4Moe, 4096, 10944, 46, 96, 8, 151552, 1e6)
        },
        "glm-4.5" => SynthShape {
            head_dim: Some(128),
            moe: moe(160, 8, 1536),
            extra: json!({"partial_rotary_factor": 0.5, "attention_bias": true, "use_qk_norm": true,
                "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1,
                "norm_topk_prob": true, "routed_scaling_factor": 2.5}),
            ..s(Arch::Glm4Moe, 5120, 12288, 92, 96, 8, 151552, 1e6)
        },
        // GPT-OSS 20B and 120B: MXFP4 experts, sinks, windows of 128 on every other layer.
        "gpt-oss-20b" => gpt_oss(24, 32),
        "gpt-oss-120b" => gpt_oss(36, 128),
        // Qwen3-Next-80B-A3B and Qwen3.5-35B-A3B: three Gated DeltaNet layers to one gated
        // full-attention layer, 512 (256) experts of which 10 (8) per token and a gated
        // shared expert.
        "qwen3-next-80b-a3b" => SynthShape {
            head_dim: Some(256),
            moe: moe(512, 10, 512),
            extra: hybrid_extra(262144),
            ..s(Arch::Qwen3Next, 2048, 5120, 48, 16, 2, 151936, 1e7)
        },
        "qwen3.5-35b-a3b" => SynthShape {
            head_dim: Some(256),
            moe: moe(256, 8, 512),
            extra: hybrid_extra(262144),
            ..s(Arch::Qwen35Moe, 2048, 5120, 40, 16, 2, 248320, 1e7)
        },
        _ => return None,
    })
}

/// The Gated DeltaNet options Qwen3-Next and Qwen3.5-35B-A3B share.
fn hybrid_extra(context: usize) -> serde_json::Value {
    json!({"shared_expert_intermediate_size": 512, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "max_position_embeddings": context})
}

/// GPT-OSS's shape with `layers` layers of `experts` experts (its two sizes differ only so).
fn gpt_oss(layers: usize, experts: usize) -> SynthShape {
    let windows: Vec<&str> = (0..layers)
        .map(|l| {
            if l % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    SynthShape {
        routing: SynthRouting::Random,
        arch: Arch::GptOss,
        hidden: 2880,
        intermediate: 2880,
        layers,
        heads: 64,
        kv_heads: 8,
        vocab: 201088,
        rope_theta: 150000.0,
        tie: false,
        head_dim: Some(64),
        moe: Some(SynthMoe {
            experts,
            top_k: 4,
            expert_size: 2880,
        }),
        extra: json!({"attention_bias": true, "sliding_window": 128, "layer_types": windows,
            "swiglu_limit": 7.0, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": false}}),
    }
}

pub const PRESETS: &[&str] = &[
    "llama-7b",
    "llama-13b",
    "mistral-7b",
    "qwen2-7b",
    "llama-70b",
    "tiny",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "tiny-moe",
    "deepseek-v3",
    "kimi-k2",
    "deepseek-v2-lite",
    "glm-4.5-air",
    "glm-4.5",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "qwen3-next-80b-a3b",
    "qwen3.5-35b-a3b",
];

/// Whether a tensor of a synthetic FP8 checkpoint is stored in FP8: the layers' projections
/// and experts, as DeepSeek-V3's official checkpoint has them (not the routers).
fn is_fp8_matrix(kind: Kind, role: crate::weights::schema::Role) -> bool {
    matches!(kind, Kind::Matrix | Kind::Expert) && role != crate::weights::schema::Role::Router
}

/// The FP8 block of synthetic checkpoints (DeepSeek-V3's).
pub const FP8_BLOCK: usize = 128;

impl SynthShape {
    /// Every tensor of the checkpoint in execution order, with its shape, as the layer schema
    /// lists them for this shape's config.
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(self
            .typed_tensors(DType::F32)?
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect())
    }

    /// [`Self::tensors`] with each one's stored type for a checkpoint of `dtype`: an FP8
    /// checkpoint holds its layer matrices in FP8, each followed by its f32 block scales, and
    /// everything else in bf16.
    pub fn typed_tensors(&self, dtype: DType) -> Result<Vec<(String, Vec<usize>, DType)>> {
        let cfg = self.model_config_for(dtype)?;
        let h = self.hidden;
        let other = if dtype.is_f8() { DType::BF16 } else { dtype };
        let mut t = vec![(Naming::Hf.embed().to_string(), vec![self.vocab, h], other)];
        let mut push = |name: String, shape: Vec<usize>, fp8: bool| {
            if name.ends_with("_blocks") || name.ends_with("_scales") {
                t.push((name, shape, DType::U8));
            } else if fp8 && dtype.is_f8() {
                let scales = vec![shape[0].div_ceil(FP8_BLOCK), shape[1].div_ceil(FP8_BLOCK)];
                t.push((name.clone(), shape, dtype));
                t.push((crate::weights::fp8_scale_name(&name), scales, DType::F32));
            } else {
                t.push((name, shape, other));
            }
        };
        for l in 0..self.layers {
            for spec in LayerSchema::new(&cfg, l).tensors {
                let fp8 = is_fp8_matrix(spec.kind, spec.role);
                if spec.kind == Kind::Expert && spec.hf_stacked() {
                    // GPT-OSS's stacked experts, in MXFP4 as its checkpoints have them.
                    let [e, r, c] = spec.stored_shape(Naming::Hf)[..] else {
                        return Err(Error::Internal("a stack of experts is 3-D".into()));
                    };
                    let name = spec.name(Naming::Hf, l);
                    push(format!("{name}_blocks"), vec![e, r, c / 32, 16], false);
                    push(format!("{name}_scales"), vec![e, r, c / 32], false);
                } else if spec.kind == Kind::Expert {
                    for e in 0..spec.experts {
                        push(
                            spec.expert_name(Naming::Hf, l, e).0,
                            spec.shape.clone(),
                            fp8,
                        );
                    }
                } else {
                    push(spec.name(Naming::Hf, l), spec.shape.clone(), fp8);
                }
            }
        }
        t.push((Naming::Hf.final_norm().to_string(), vec![h], other));
        if !self.tie {
            t.push((Naming::Hf.head().to_string(), vec![self.vocab, h], other));
        }
        Ok(t)
    }

    /// The tensors whose values correlated routing shapes: every router, and the embedding.
    fn special_values(&self, dtype: DType) -> Result<Vec<(String, Values)>> {
        let (SynthRouting::Correlated { strength }, Some(m)) = (self.routing, &self.moe) else {
            return Ok(vec![]);
        };
        let cfg = self.model_config_for(dtype)?;
        let mut v = vec![(
            Naming::Hf.embed().to_string(),
            Values::Embed {
                hidden: self.hidden,
                experts: m.experts,
                picks: 2 * m.top_k,
                strength,
            },
        )];
        for l in 0..self.layers {
            if let Some(r) = LayerSchema::new(&cfg, l).get(crate::weights::schema::Role::Router) {
                v.push((
                    r.name(Naming::Hf, l),
                    Values::Router {
                        hidden: self.hidden,
                    },
                ));
            }
        }
        Ok(v)
    }

    /// The shape's config. The shape is described in transformers' terms and read by the
    /// config reader, so the architecture's defaults apply as they do to a downloaded model;
    /// `config.json` is then written from the result by the one writer,
    /// [`ModelConfig::to_hf_json`].
    pub(crate) fn model_config_for(&self, dtype: DType) -> Result<ModelConfig> {
        let mut v = json!({
            "architectures": [self.arch.hf_name()],
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie,
            "bos_token_id": 256,
            "eos_token_id": 257,
        });
        if let Some(d) = self.head_dim {
            v["head_dim"] = json!(d);
        }
        if let Some(m) = &self.moe {
            v["num_experts_per_tok"] = json!(m.top_k);
            if matches!(
                self.arch,
                Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe
            ) {
                v["n_routed_experts"] = json!(m.experts);
                v["moe_intermediate_size"] = json!(m.expert_size);
            } else if self.arch == Arch::Mixtral {
                v["num_local_experts"] = json!(m.experts);
            } else {
                v["num_experts"] = json!(m.experts);
                v["moe_intermediate_size"] = json!(m.expert_size);
                v["norm_topk_prob"] = json!(true);
            }
        }
        if let Some(extra) = self.extra.as_object() {
            for (k, x) in extra {
                v[k] = x.clone();
            }
            // A shape's layer pattern repeats over however many layers `--layers` asks for.
            if let Some(types) = extra.get("layer_types").and_then(|t| t.as_array()) {
                let n = types.len().max(1);
                v["layer_types"] = json!((0..self.layers)
                    .map(|l| types[l % n].clone())
                    .collect::<Vec<_>>());
            }
            // transformers-4 style RoPE scaling, as DeepSeek's configs have it.
            if extra.contains_key("rope_scaling") {
                v.as_object_mut().map(|o| o.remove("rope_parameters"));
                v["rope_theta"] = json!(self.rope_theta);
            }
        }
        if self.arch == Arch::GptOss {
            v["num_local_experts"] = json!(self.moe.as_ref().map_or(0, |m| m.experts));
            v["quantization_config"] = json!({"quant_method": "mxfp4"});
        }
        if dtype.is_f8() {
            v["quantization_config"] = json!({"quant_method": "fp8", "fmt": "e4m3",
                "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]});
        }
        ModelConfig::from_value(Path::new("config.json"), &v)
    }
}

/// A fast deterministic generator (splitmix64), seeded per tensor.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, mixed with the seed.
    crate::util::fnv1a64(name.as_bytes()) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a tensor's values are, beyond its name's noise.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Values {
    Plain,
    /// A router of correlated routing: `[experts, hidden]`.
    Router {
        hidden: usize,
    },
    /// The embedding under correlated routing: `[vocab, hidden]`, each row with a component
    /// along the directions of `picks` of the `experts`.
    Embed {
        hidden: usize,
        experts: usize,
        picks: usize,
        strength: f32,
    },
}

/// How much of a correlated router row is its expert's shared direction.
const ROUTER_SHARE: f32 = 0.9;

/// Expert `e`'s direction under correlated routing, at column `j`: the same in every layer,
/// with unit variance.
fn direction(seed: u64, hidden: usize, e: usize, j: usize) -> f32 {
    let mut r =
        Rng(seed ^ 0xD1EC_7104 ^ ((e * hidden + j) as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    unit(r.next()) * 3f32.sqrt()
}

/// A uniform value in [-1, 1) from 64 random bits.
fn unit(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Writes `numel` values of tensor `name`: norms are 1, everything else uniform with std 0.02
/// (plus, under correlated routing, the routers' and the embedding's shared directions).
fn write_values(
    w: &mut impl Write,
    name: &str,
    numel: usize,
    dtype: DType,
    seed: u64,
    values: Values,
) -> std::io::Result<()> {
    let is_norm = name.ends_with("norm.weight");
    let is_scale = name.ends_with("_scale_inv");
    let mut rng = Rng(name_seed(seed, name));
    if dtype == DType::U8 {
        // MXFP4: random codes under scales of 2^-7, so weights have a std of about 0.02.
        let mut left = numel;
        let mut buf = vec![0u8; numel.min(1 << 20)];
        while left > 0 {
            let n = left.min(buf.len());
            for b in &mut buf[..n] {
                *b = if name.ends_with("_scales") {
                    120
                } else {
                    (rng.next() >> 32) as u8
                };
            }
            w.write_all(&buf[..n])?;
            left -= n;
        }
        return Ok(());
    }
    let amp = 0.02f32 * 3f32.sqrt();
    // The embedding row being written, and its experts and their weights.
    let mut row = usize::MAX;
    let mut picked: Vec<(usize, f32)> = vec![];
    let mut value = |i: usize, noise: f32| -> f32 {
        match values {
            Values::Plain => noise * amp,
            Values::Router { hidden } => {
                let (e, j) = (i / hidden, i % hidden);
                0.02 * (ROUTER_SHARE * direction(seed, hidden, e, j)
                    + (1.0 - ROUTER_SHARE * ROUTER_SHARE).sqrt() * noise * 3f32.sqrt())
            }
            Values::Embed {
                hidden,
                experts,
                picks,
                strength,
            } => {
                let (t, j) = (i / hidden, i % hidden);
                if t != row {
                    row = t;
                    let mut r = Rng(name_seed(seed, "correlated routing") ^ t as u64);
                    picked.clear();
                    while picked.len() < picks.min(experts) {
                        let e = (r.next() % experts as u64) as usize;
                        if picked.iter().all(|&(p, _)| p != e) {
                            picked.push((e, 0.5 + 0.5 * unit(r.next()).abs()));
                        }
                    }
                }
                noise * amp
                    + strength
                        * picked
                            .iter()
                            .map(|&(e, c)| c * direction(seed, hidden, e, j))
                            .sum::<f32>()
            }
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut i = 0;
    let mut left = numel;
    while left > 0 {
        let n = left.min(1 << 18);
        buf.clear();
        for _ in 0..n {
            let x = if is_norm {
                1.0
            } else {
                value(i, unit(rng.next()))
            };
            i += 1;
            match dtype {
                DType::F32 if is_scale => buf.extend_from_slice(&FP8_SCALE.to_le_bytes()),
                DType::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                DType::BF16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                DType::F8E4M3 => buf.push(e4m3(x / FP8_SCALE)),
                DType::F8E5M2 => {
                    buf.push((half::f16::from_f32(x / FP8_SCALE).to_bits() >> 8) as u8)
                }
                DType::U8 => unreachable!("written above"),
            }
        }
        w.write_all(&buf)?;
        left -= n;
    }
    Ok(())
}

/// The block scale of synthetic FP8 weights: their ±0.035 range over e4m3's ±448.
const FP8_SCALE: f32 = 0.02 * 1.732_050_8 / 448.0;

/// The e4m3 byte nearest to `x` (saturating at ±448).
fn e4m3(x: f32) -> u8 {
    let t = crate::weights::mat::F8Kind::E4M3.table();
    // Bytes 0..=0x7E are the non-negative finite values, in increasing order.
    let a = x.abs().min(448.0);
    let i = t[..0x7F].partition_point(|&v| v < a);
    let i = if i > 0 && (i == 0x7F || a - t[i - 1] <= t[i] - a) {
        i - 1
    } else {
        i
    };
    (i as u8) | if x < 0.0 { 0x80 } else { 0 }
}

/// A byte-level BPE tokenizer with no merges: every byte is a token, plus `<s>` and `</s>`.
/// Enough for every command to run on a synthetic model.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
        vocab.insert(c.to_string(), json!(b));
    }
    let special = |id: u32, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes a synthetic Hugging Face folder to `out`. `progress(done, total)` is called with bytes.
pub fn write_hf(
    shape: &SynthShape,
    dtype: DType,
    seed: u64,
    shard_bytes: u64,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<()> {
    write_hf_as(shape, dtype, seed, shard_bytes, out, false, progress)
}

/// [`write_hf`], or with `sparse` only the headers: each shard is extended to its full size
/// as a hole that reads as zeros, so that a full-size shape can be inspected and planned
/// without writing its bytes.
pub fn write_hf_as(
    shape: &SynthShape,
    dtype: DType,
    seed: u64,
    shard_bytes: u64,
    out: &Path,
    sparse: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    if shape.heads == 0
        || shape.kv_heads == 0
        || (shape.head_dim.is_none() && !shape.hidden.is_multiple_of(shape.heads))
        || !shape.heads.is_multiple_of(shape.kv_heads)
    {
        return Err(Error::Invalid(format!(
            "shape: hidden {} must divide by heads {}, which must divide by kv heads {}",
            shape.hidden, shape.heads, shape.kv_heads
        )));
    }
    if let Some(m) = &shape.moe {
        if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
            return Err(Error::Invalid(format!(
                "shape: top-k {} must be between 1 and the {} experts",
                m.top_k, m.experts
            )));
        }
    }
    crate::util::write_folder(out, |tmp| {
        write_into(shape, dtype, seed, shard_bytes, tmp, sparse, &mut progress)
    })
}

fn write_into(
    shape: &SynthShape,
    dtype: DType,
    seed: u64,
    shard_bytes: u64,
    dir: &Path,
    sparse: bool,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    let tensors = shape.typed_tensors(dtype)?;
    let values = shape.special_values(dtype)?;
    let bytes = |s: &[usize], d: DType| s.iter().product::<usize>() as u64 * d.size() as u64;
    let total: u64 = tensors.iter().map(|(_, s, d)| bytes(s, *d)).sum();
    // Group tensors into shards of about `shard_bytes`, as transformers' save_pretrained does.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, (_, s, d)) in tensors.iter().enumerate() {
        let b = bytes(s, *d);
        if cur > 0 && cur + b > shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().unwrap().push(i);
        cur += b;
    }
    let n = shards.len();
    let io = |p: &Path, e: std::io::Error| Error::file(p, format!("write failed: {e}"));
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    for (k, members) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let path = dir.join(&fname);
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for &i in members {
            let (name, s, d) = &tensors[i];
            let b = bytes(s, *d);
            header.insert(
                name.clone(),
                json!({"dtype": d.name(), "shape": s, "data_offsets": [off, off + b]}),
            );
            off += b;
            weight_map.insert(name.clone(), json!(fname));
        }
        let mut h = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let f = File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = BufWriter::with_capacity(4 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(|e| io(&path, e))?;
        w.write_all(&h).map_err(|e| io(&path, e))?;
        if sparse {
            let f = w.into_inner().map_err(|e| io(&path, e.into_error()))?;
            f.set_len(8 + h.len() as u64 + off)
                .map_err(|e| io(&path, e))?;
            done += off;
            progress(done, total);
            continue;
        }
        for &i in members {
            let (name, s, d) = &tensors[i];
            let numel = s.iter().product::<usize>();
            let v = values
                .iter()
                .find(|(n, _)| n == name)
                .map_or(Values::Plain, |(_, v)| *v);
            write_values(&mut w, name, numel, *d, seed, v).map_err(|e| io(&path, e))?;
            done += bytes(s, *d);
            progress(done, total);
        }
        w.flush().map_err(|e| io(&path, e))?;
    }
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).map_err(|e| io(&p, e))
    };
    if n > 1 {
        write_json(
            "model.safetensors.index.json",
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 | DType::F8E4M3 | DType::F8E5M2 | DType::U8 => "bfloat16",
    };
    write_json(
        "config.json",
        &shape.model_config_for(dtype)?.to_hf_json(torch_dtype),
    )?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": 256, "eos_token_id": 257}),
    )?;
    write_json("tokenizer.json", &byte_tokenizer_json())?;
    write_json(
        "tokenizer_config.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 4096,
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"}),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("tokenizer.json");
        std::fs::write(&p, byte_tokenizer_json().to_string()).unwrap();
        let t = tokenizers::Tokenizer::from_file(&p).unwrap();
        let text = "Héllo, wörld!\n\t東京 😊";
        let ids = t.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 256);
        assert_eq!(ids.len(), 1 + text.len());
        assert_eq!(t.decode(&ids, true).unwrap(), text);
    }
}

//! Conversion between checkpoint formats.
//!
//! - [`to_gguf`]: a Hugging Face folder to a GGUF file llama.cpp loads, in full precision or
//!   quantized. Each layer's tensors are contiguous and in execution order, so streaming a
//!   layer is one sequential read.
//! - [`to_hf`]: a GGUF file to a Hugging Face folder of f32 safetensors (dequantizing), so a
//!   quantized model can be compared against its own full-precision form.
//!
//! Both stream: a tensor is read, transformed and encoded in row chunks, in parallel over the
//! chunks, and written before the next is read.

mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::{Arch, ModelConfig, MoeSpec, MoeStyle, RopeConfig, RopeScaling, Scoring};
use crate::engine::ModelInfo;
use crate::error::{Error, Result};
use crate::weights::gguf::Value;
use crate::weights::gguf_keys::{self as keys, Key};
use crate::weights::gguf_write::{GgufPlan, OutFile, TensorPlan};
use crate::weights::mat::{AlignedBuf, Form};
use crate::weights::schema::{self, Kind, LayerSchema, Naming, Role};
use crate::weights::WeightSource;

/// The storage type asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the value projection and the MLP's down
    /// projection in the first and last eighth of the layers and every third between.
    Q4KM,
    Q5K,
    Q6K,
}

pub const QUANT_NAMES: &str = "q8_0, q4_k, q4_k_m, q5_k, q6_k, q4_0, f16, bf16, f32";

impl std::str::FromStr for Quant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "bf16" => Quant::BF16,
            "q8_0" => Quant::Q8_0,
            "q4_0" => Quant::Q4_0,
            "q4_k" | "q4_k_s" => Quant::Q4K,
            "q4_k_m" => Quant::Q4KM,
            "q5_k" => Quant::Q5K,
            "q6_k" => Quant::Q6K,
            other => {
                return Err(Error::Invalid(format!(
                    "type `{other}` is not supported (supported: {QUANT_NAMES})"
                )))
            }
        })
    }
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::BF16 => "bf16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4K => "q4_k",
            Quant::Q4KM => "q4_k_m",
            Quant::Q5K => "q5_k",
            Quant::Q6K => "q6_k",
        }
    }
    fn ggml(self) -> GgmlDType {
        match self {
            Quant::F32 => GgmlDType::F32,
            Quant::F16 => GgmlDType::F16,
            Quant::BF16 => GgmlDType::BF16,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4K | Quant::Q4KM => GgmlDType::Q4K,
            Quant::Q5K => GgmlDType::Q5K,
            Quant::Q6K => GgmlDType::Q6K,
        }
    }
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u64 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4K => 14, // Q4_K_S
            Quant::Q4KM => 15,
            Quant::Q5K => 16, // Q5_K_S
            Quant::Q6K => 18,
            Quant::BF16 => 32,
        }
    }
}

/// The type a matrix with rows of `cols` values is stored in. Rows that do not fill whole
/// blocks fall back the way llama.cpp's quantizer does; the output head keeps more bits
/// under the 4- and 5-bit k-quants, as llama.cpp's Q4_K/Q5_K mixes do.
fn matrix_type(q: Quant, cols: usize, is_head: bool, more_bits: bool) -> GgmlDType {
    let want = match q {
        Quant::Q4K | Quant::Q4KM | Quant::Q5K if is_head => GgmlDType::Q6K,
        Quant::Q4KM if more_bits => GgmlDType::Q6K,
        _ => q.ggml(),
    };
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    let chain: &[GgmlDType] = match want {
        GgmlDType::Q4K => &[GgmlDType::Q4K, GgmlDType::Q5_0, GgmlDType::F16],
        GgmlDType::Q5K => &[GgmlDType::Q5K, GgmlDType::Q5_1, GgmlDType::F16],
        GgmlDType::Q6K => &[GgmlDType::Q6K, GgmlDType::Q8_0, GgmlDType::F16],
        GgmlDType::Q8_0 => &[GgmlDType::Q8_0, GgmlDType::F16],
        GgmlDType::Q4_0 => &[GgmlDType::Q4_0, GgmlDType::F16],
        t => return t,
    };
    chain
        .iter()
        .copied()
        .find(|&t| fits(t))
        .unwrap_or(GgmlDType::F16)
}

/// How a tensor's values change between the formats.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transform {
    None,
    /// Llama q/k rows: from transformers' half-split RoPE layout to llama.cpp's interleaved
    /// pairs (`true`), or back (`false`), per head of `head_dim` rows.
    Permute {
        head_dim: usize,
        to_gguf: bool,
    },
    /// Gemma norms: transformers stores w and computes (1 + w); llama.cpp stores 1 + w.
    Add(f32),
}

/// Where a tensor's values come from.
#[derive(Debug, Clone)]
enum Data {
    Source(String),
    /// Rows from the given one of a source tensor (one expert of a GGUF stack).
    Rows(String, usize),
    /// Source matrices of one shape, stacked along a new first axis (a layer's experts).
    Stack(Vec<String>),
    Values(Vec<f32>),
    /// Latent attention's `kv_b_proj` (`[heads · (nope + v), rank]`) as llama.cpp's split
    /// `attn_k_b` (each head's key rows transposed, `[rank, nope]`) or `attn_v_b` (its value
    /// rows); or, from GGUF, the whole built back from the two.
    KvBPart(String, Latent, bool),
    KvBJoin(String, String, Latent),
    /// Every other row (`odd`: from the second) of a stack of experts whose gate and up rows
    /// are interleaved (GPT-OSS in transformers), giving llama.cpp's separate gate or up stack.
    Alternate(String, bool),
    /// Every other column of a `[experts, 2 · width]` bias, likewise.
    AlternateCols(String, bool),
}

/// The shape of latent attention's `kv_b_proj`.
#[derive(Debug, Clone, Copy)]
struct Latent {
    heads: usize,
    nope: usize,
    v: usize,
    rank: usize,
}

impl Latent {
    fn of(cfg: &ModelConfig) -> Option<Latent> {
        cfg.mla.as_ref().map(|m| Latent {
            heads: cfg.num_heads,
            nope: m.qk_nope_head_dim,
            v: m.v_head_dim,
            rank: m.kv_lora_rank,
        })
    }

    /// Output rows per head of the item `data` makes.
    fn rows_per_head(self, data: &Data) -> usize {
        match data {
            Data::KvBPart(_, _, true) => self.rank,
            Data::KvBPart(_, _, false) => self.v,
            _ => self.nope + self.v,
        }
    }

    /// Heads `h0 .. h0 + n` of the item `data` makes, as f32 rows.
    fn heads(self, src: &dyn WeightSource, data: &Data, h0: usize, n: usize) -> Result<Vec<f32>> {
        let (nope, v, rank) = (self.nope, self.v, self.rank);
        let per = nope + v;
        let mut out = Vec::with_capacity(n * self.rows_per_head(data) * rank.max(nope));
        for h in h0..h0 + n {
            match data {
                Data::KvBPart(name, _, key) => {
                    let shape = [self.heads * per, rank];
                    if *key {
                        let k = read_f32(src, name, &shape, h * per, nope)?;
                        // [nope, rank] → [rank, nope]
                        for r in 0..rank {
                            out.extend((0..nope).map(|j| k[j * rank + r]));
                        }
                    } else {
                        out.extend(read_f32(src, name, &shape, h * per + nope, v)?);
                    }
                }
                Data::KvBJoin(kb, vb, _) => {
                    let k = read_f32(src, kb, &[self.heads * rank, nope], h * rank, rank)?;
                    // [rank, nope] → [nope, rank]
                    for j in 0..nope {
                        out.extend((0..rank).map(|r| k[r * nope + j]));
                    }
                    out.extend(read_f32(src, vb, &[self.heads * v, rank], h * v, v)?);
                }
                _ => return Err(Error::Internal("not a latent attention item".into())),
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
struct Item {
    out: TensorPlan,
    data: Data,
    transform: Transform,
}

impl Transform {
    /// The schema's transform, applied in the direction of the conversion.
    fn of(t: schema::Transform, to_gguf: bool) -> Transform {
        match t {
            schema::Transform::None => Transform::None,
            schema::Transform::Permute { head_dim } => Transform::Permute { head_dim, to_gguf },
            schema::Transform::AddOne => Transform::Add(if to_gguf { 1.0 } else { -1.0 }),
        }
    }
}

/// Values per chunk that one thread reads and encodes at a time (64 MiB of f32).
const CHUNK_ELEMS: usize = 16 << 20;

/// Converts the Hugging Face folder `src` to a GGUF file at `out`, with `extra` metadata.
/// `progress(done, total)` counts output bytes.
pub fn to_gguf(
    src: &Path,
    quant: Quant,
    out: &Path,
    extra: &[(String, Value)],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if crate::weights::is_gguf(src) {
        return Err(Error::file(
            src,
            "is already a GGUF file; convert takes a Hugging Face model folder",
        ));
    }
    let info = ModelInfo::open(src)?;
    let (mut plan, items) = gguf_plan(&info, quant, out)?;
    for (k, v) in extra {
        plan.set(k.clone(), v.clone());
    }
    check_round_trip(&info.cfg, &plan)?;
    // DeepSeek's GGUF form has leading dense layers (others are refused in the plan).
    if let Some(m) = info
        .cfg
        .moe
        .as_ref()
        .filter(|m| m.sparse.contains(&false) && m.style != MoeStyle::Deepseek)
    {
        let dense: Vec<usize> = (0..m.sparse.len()).filter(|&l| !m.sparse[l]).collect();
        tracing::warn!(
            "{}: layers {dense:?} are dense among sparse ones; this engine reads the GGUF file, but llama.cpp expects every layer of a {} model to have experts",
            src.display(),
            keys::arch_name(info.cfg.arch).unwrap_or("")
        );
    }
    write_gguf(&info, &plan, &items, progress)
}

fn gguf_plan(info: &ModelInfo, quant: Quant, out: &Path) -> Result<(GgufPlan, Vec<Item>)> {
    let cfg = &info.cfg;
    let src = info.src.as_ref();
    let a = keys::arch_name(cfg.arch).ok_or_else(|| {
        Error::config(
            &cfg.path,
            "architectures",
            format!(
                "{} cannot be written to GGUF by this version (it runs from the Hugging Face folder)",
                cfg.arch.hf_name()
            ),
        )
    })?;
    let key = |k: Key| k.of(a);
    let mut plan = GgufPlan::new(out);
    let u = |n: usize| Value::U(n as u64);
    let name = info
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    plan.set(keys::ARCHITECTURE, Value::Str(a.into()));
    plan.set(keys::NAME, Value::Str(name));
    plan.set(keys::FILE_TYPE, Value::U(quant.file_type()));
    plan.set(keys::QUANTIZATION_VERSION, Value::U(2));
    plan.set(key(Key::ContextLength), u(cfg.max_position_embeddings));
    plan.set(key(Key::EmbeddingLength), u(cfg.hidden_size));
    plan.set(key(Key::BlockCount), u(cfg.num_layers));
    plan.set(key(Key::FeedForwardLength), u(cfg.intermediate_size));
    plan.set(key(Key::HeadCount), u(cfg.num_heads));
    plan.set(key(Key::HeadCountKv), u(cfg.num_kv_heads));
    plan.set(key(Key::KeyLength), u(cfg.head_dim));
    plan.set(key(Key::ValueLength), u(cfg.head_dim));
    plan.set(key(Key::RopeDimensionCount), u(cfg.rotary_dim));
    plan.set(key(Key::VocabSize), u(cfg.vocab_size));
    plan.set(key(Key::LayerNormRmsEpsilon), Value::F(cfg.rms_norm_eps));
    plan.set(key(Key::RopeFreqBase), Value::F(cfg.rope.theta as f64));
    let mut rope_freqs = None;
    let mut long_rope = None;
    match &cfg.rope.scaling {
        RopeScaling::None => {}
        &RopeScaling::Linear { factor } => {
            plan.set(key(Key::RopeScalingType), Value::Str("linear".into()));
            plan.set(key(Key::RopeScalingFactor), Value::F(factor as f64));
        }
        &RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            ..
        } => {
            plan.set(key(Key::RopeScalingType), Value::Str("yarn".into()));
            plan.set(key(Key::RopeScalingFactor), Value::F(factor as f64));
            plan.set(
                key(Key::RopeScalingOriginalContextLength),
                u(original_max_position_embeddings),
            );
        }
        RopeScaling::Llama3 { .. } => {
            // llama.cpp applies Llama 3.1's rescaling as per-frequency divisors.
            let plain = RopeConfig {
                theta: cfg.rope.theta,
                scaling: RopeScaling::None,
            };
            let base = crate::model::rope::Rope::new(&plain, cfg.rotary_dim, None, 0);
            let scaled = crate::model::rope::Rope::new(&cfg.rope, cfg.rotary_dim, None, 0);
            rope_freqs = Some(
                base.inv_freq()
                    .iter()
                    .zip(scaled.inv_freq())
                    .map(|(b, s)| b / s)
                    .collect::<Vec<f32>>(),
            );
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            // llama.cpp keeps the factor sets as tensors and the rest as metadata.
            plan.set(
                key(Key::RopeScalingOriginalContextLength),
                u(*original_max_position_embeddings),
            );
            plan.set(
                key(Key::RopeScalingAttnFactor),
                Value::F(*attention_factor as f64),
            );
            long_rope = Some((long_factor.clone(), short_factor.clone()));
        }
    }
    let windows: Vec<usize> = cfg.layer_windows.iter().flatten().copied().collect();
    if let Some(&w) = windows.first() {
        plan.set(key(Key::SlidingWindow), u(w));
    }
    if matches!(cfg.arch, Arch::Gemma3 | Arch::GptOss) {
        // llama.cpp's default pattern: every 6th (Gemma 3) or 2nd (GPT-OSS) layer global.
        let every = if cfg.arch == Arch::Gemma3 { 6 } else { 2 };
        let default_pattern =
            (0..cfg.num_layers).all(|i| cfg.layer_windows[i].is_some() == (i % every < every - 1));
        if !default_pattern {
            plan.set(
                key(Key::SlidingWindowPattern),
                Value::Array(
                    cfg.layer_windows
                        .iter()
                        .map(|w| Value::Bool(w.is_some()))
                        .collect(),
                ),
            );
        }
        if let Some(local) = &cfg.rope_local {
            plan.set(key(Key::RopeFreqBaseSwa), Value::F(local.theta as f64));
        }
    }
    let default_scale = match (cfg.arch, cfg.num_layers) {
        (Arch::Gemma3, 62) | (Arch::Gemma2, 46) => {
            1.0 / ((cfg.hidden_size / cfg.num_heads) as f64).sqrt()
        }
        _ => 1.0 / (cfg.head_dim as f64).sqrt(),
    };
    if (cfg.attn_scale - default_scale).abs() > 1e-9 {
        plan.set(key(Key::AttentionScale), Value::F(cfg.attn_scale));
    }
    if let Some(c) = cfg.final_logit_softcap {
        plan.set(key(Key::FinalLogitSoftcapping), Value::F(c));
    }
    if let Some(c) = cfg.attn_logit_softcap {
        plan.set(key(Key::AttnLogitSoftcapping), Value::F(c));
    }
    if let Some(m) = &cfg.moe {
        plan.set(key(Key::ExpertCount), u(m.experts));
        plan.set(key(Key::ExpertUsedCount), u(m.top_k));
        if cfg.arch != Arch::Mixtral {
            plan.set(key(Key::ExpertFeedForwardLength), u(m.expert_size));
        }
        if m.style == MoeStyle::Deepseek {
            deepseek_moe_keys(&mut plan, cfg, m, a)?;
        } else {
            if let Some(sh) = m.shared_size {
                plan.set(key(Key::ExpertSharedFeedForwardLength), u(sh));
            }
            let norm_default = cfg.arch != Arch::Qwen2Moe;
            if m.norm_topk != norm_default {
                plan.set(key(Key::ExpertWeightsNorm), Value::Bool(m.norm_topk));
            }
        }
    }
    if let Some(m) = &cfg.mla {
        // llama.cpp's absorbed form: one KV head of the latent's width, the model's head
        // widths under the `_mla` keys.
        plan.set(key(Key::HeadCountKv), u(1));
        plan.set(key(Key::KeyLength), u(m.cache_dim()));
        plan.set(key(Key::ValueLength), u(m.kv_lora_rank));
        plan.set(key(Key::KeyLengthMla), u(cfg.head_dim));
        plan.set(key(Key::ValueLengthMla), u(m.v_head_dim));
        plan.set(key(Key::KvLoraRank), u(m.kv_lora_rank));
        if let Some(q) = m.q_lora_rank {
            plan.set(key(Key::QLoraRank), u(q));
        }
        if let RopeScaling::Yarn {
            mscale_all_dim: Some(all),
            ..
        } = cfg.rope.scaling
        {
            plan.set(key(Key::RopeScalingYarnLogMul), Value::F(0.1 * all));
        }
    }
    if let RopeScaling::Yarn {
        beta_fast,
        beta_slow,
        ..
    } = cfg.rope.scaling
    {
        plan.set(key(Key::RopeScalingYarnBetaFast), Value::F(beta_fast));
        plan.set(key(Key::RopeScalingYarnBetaSlow), Value::F(beta_slow));
    }
    for (k, v) in tokenizer::gguf_metadata(&info.dir, cfg)? {
        plan.set(k, v);
    }

    // Layers that Q4_K_M gives more bits (llama.cpp's `use_more_bits`).
    let n = cfg.num_layers;
    let more_bits = |at: Option<(usize, Role)>| -> bool {
        let Some((i, role)) = at else { return false };
        matches!(
            role,
            Role::V | Role::Down | Role::ExpertDown | Role::SharedDown
        ) && (i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2)
    };
    // Tensors, in execution order.
    let mut items = Vec::new();
    let add = |plan: &mut GgufPlan,
               items: &mut Vec<Item>,
               out_name: String,
               src_name: &str,
               is_head: bool,
               at: Option<(usize, Role)>,
               transform: Transform|
     -> Result<bool> {
        let Some(m) = src.meta(src_name) else {
            return Ok(false);
        };
        // Vectors (a [1, n] gate included) are 1-D and f32 in GGUF, as is the router, which
        // llama.cpp never quantizes.
        let shape: Vec<usize> = if m.shape.iter().filter(|&&d| d != 1).count() <= 1 {
            vec![m.numel()]
        } else {
            m.shape.clone()
        };
        // GPT-OSS's expert biases are `[experts, rows]`, and f32 too (llama.cpp adds them
        // in f32 only).
        let small = matches!(
            at,
            Some((
                _,
                Role::Router | Role::ExpertDownBias | Role::ExpertGateBias | Role::ExpertUpBias
            ))
        );
        let dtype = if shape.len() == 1 || small {
            GgmlDType::F32
        } else {
            matrix_type(quant, *shape.last().unwrap(), is_head, more_bits(at))
        };
        let out = TensorPlan {
            name: out_name,
            shape,
            form: Form::of_ggml(dtype),
        };
        plan.add_tensor(out.clone())?;
        items.push(Item {
            out,
            data: Data::Source(src_name.to_string()),
            transform,
        });
        Ok(true)
    };
    let tied = cfg.tie_word_embeddings;
    add(
        &mut plan,
        &mut items,
        Naming::Gguf.embed().into(),
        Naming::Hf.embed(),
        tied,
        None,
        Transform::None,
    )?;
    let mut values = vec![];
    if let Some(f) = rope_freqs {
        values.push((Naming::GGUF_ROPE_FREQS, f));
    }
    if let Some((long, short)) = long_rope {
        values.push((Naming::GGUF_ROPE_FACTORS_LONG, long));
        values.push((Naming::GGUF_ROPE_FACTORS_SHORT, short));
    }
    for (name, f) in values {
        let out = TensorPlan {
            name: name.into(),
            shape: vec![f.len()],
            form: Form::of_ggml(GgmlDType::F32),
        };
        plan.add_tensor(out.clone())?;
        items.push(Item {
            out,
            data: Data::Values(f),
            transform: Transform::None,
        });
    }
    // GPT-OSS's interleaved gate/up experts and their biases are written split, as
    // llama.cpp's converter does; MXFP4 experts stay MXFP4.
    let split_gate_up = cfg.block.gate_up_interleaved.then(|| {
        let mut c = cfg.clone();
        c.block.gate_up_interleaved = false;
        c
    });
    // Latent attention's kv_b_proj is written split, as llama.cpp's converter does.
    let split_cfg = cfg.mla.is_some().then(|| {
        let mut c = cfg.clone();
        c.block.kv_b_split = true;
        c
    });
    for l in 0..cfg.num_layers {
        for t in &LayerSchema::new(cfg, l).tensors {
            if let (Role::ExpertGateUp | Role::ExpertGateUpBias, Some(sc)) =
                (t.role, &split_gate_up)
            {
                let schema = LayerSchema::new(sc, l);
                let parts = if t.role == Role::ExpertGateUp {
                    [Role::ExpertGate, Role::ExpertUp]
                } else {
                    [Role::ExpertGateBias, Role::ExpertUpBias]
                };
                for (role, odd) in parts.into_iter().zip([false, true]) {
                    let part = schema.get(role).ok_or_else(|| {
                        Error::Internal(format!("no {role:?} in a split GPT-OSS layer"))
                    })?;
                    let shape = part.stored_shape(Naming::Gguf);
                    let hf = t.name(Naming::Hf, l);
                    let (form, data) = if t.role == Role::ExpertGateUp {
                        (
                            expert_form(src, &hf, quant, shape[2])?,
                            Data::Alternate(hf, odd),
                        )
                    } else {
                        (Form::F32, Data::AlternateCols(hf, odd))
                    };
                    let out = TensorPlan {
                        name: part.name(Naming::Gguf, l),
                        form,
                        shape,
                    };
                    plan.add_tensor(out.clone())?;
                    items.push(Item {
                        out,
                        data,
                        transform: Transform::None,
                    });
                }
                continue;
            }
            if t.kind == Kind::Expert && t.hf_stacked() {
                let shape = t.stored_shape(Naming::Gguf);
                let hf = t.name(Naming::Hf, l);
                let out = TensorPlan {
                    name: t.name(Naming::Gguf, l),
                    form: expert_form(src, &hf, quant, shape[2])?,
                    shape,
                };
                plan.add_tensor(out.clone())?;
                items.push(Item {
                    out,
                    data: Data::Source(hf),
                    transform: Transform::None,
                });
                continue;
            }
            if let (Role::KvB, Some(sc), Some(lat)) = (t.role, &split_cfg, Latent::of(cfg)) {
                let schema = LayerSchema::new(sc, l);
                for (role, key) in [(Role::KB, true), (Role::VB, false)] {
                    let part = schema.get(role).ok_or_else(|| {
                        Error::Internal(format!("no {role:?} in a split latent layer"))
                    })?;
                    let shape = part.stored_shape(Naming::Gguf);
                    let out = TensorPlan {
                        name: part.name(Naming::Gguf, l),
                        form: Form::of_ggml(matrix_type(quant, shape[2], false, false)),
                        shape,
                    };
                    plan.add_tensor(out.clone())?;
                    items.push(Item {
                        out,
                        data: Data::KvBPart(t.name(Naming::Hf, l), lat, key),
                        transform: Transform::None,
                    });
                }
                continue;
            }
            if t.kind == Kind::Expert {
                // llama.cpp stacks a layer's experts in one tensor.
                let shape = t.stored_shape(Naming::Gguf);
                let out = TensorPlan {
                    name: t.name(Naming::Gguf, l),
                    form: Form::of_ggml(matrix_type(
                        quant,
                        shape[2],
                        false,
                        more_bits(Some((l, t.role))),
                    )),
                    shape,
                };
                plan.add_tensor(out.clone())?;
                items.push(Item {
                    out,
                    data: Data::Stack(
                        (0..t.experts)
                            .map(|e| t.expert_name(Naming::Hf, l, e).0)
                            .collect(),
                    ),
                    transform: Transform::of(t.transform, true),
                });
                continue;
            }
            add(
                &mut plan,
                &mut items,
                t.name(Naming::Gguf, l),
                &t.name(Naming::Hf, l),
                false,
                Some((l, t.role)),
                Transform::of(t.transform, true),
            )?;
        }
    }
    add(
        &mut plan,
        &mut items,
        Naming::Gguf.final_norm().into(),
        Naming::Hf.final_norm(),
        false,
        None,
        final_norm_transform(cfg, true),
    )?;
    if !tied {
        add(
            &mut plan,
            &mut items,
            Naming::Gguf.head().into(),
            Naming::Hf.head(),
            true,
            None,
            Transform::None,
        )?;
    }
    Ok((plan, items))
}

/// The GGUF form of a stack of experts: MXFP4 stays MXFP4 (as llama.cpp's converter keeps
/// GPT-OSS's); otherwise the requested type.
fn expert_form(src: &dyn WeightSource, name: &str, quant: Quant, cols: usize) -> Result<Form> {
    Ok(match src.form(name)? {
        Form::Mxfp4 { .. } => Form::Mxfp4 { q8: true },
        _ => Form::of_ggml(matrix_type(quant, cols, false, false)),
    })
}

/// DeepSeek's (and GLM-4.5's) routing in llama.cpp's keys.
fn deepseek_moe_keys(plan: &mut GgufPlan, cfg: &ModelConfig, m: &MoeSpec, a: &str) -> Result<()> {
    let key = |k: Key| k.of(a);
    let u = |n: usize| Value::U(n as u64);
    if let Some(sh) = m.shared_size {
        if sh % m.expert_size != 0 {
            return Err(Error::config(
                &cfg.path,
                "n_shared_experts",
                format!(
                    "a shared expert of {sh} is not a whole number of {}-wide experts, as llama.cpp counts them",
                    m.expert_size
                ),
            ));
        }
        plan.set(key(Key::ExpertSharedCount), u(sh / m.expert_size));
    } else {
        plan.set(key(Key::ExpertSharedCount), u(0));
    }
    let dense = m.sparse.iter().take_while(|&&s| !s).count();
    plan.set(key(Key::LeadingDenseBlockCount), u(dense));
    if m.sparse[dense..].contains(&false) {
        return Err(Error::config(
            &cfg.path,
            "moe_layer_freq",
            "llama.cpp's GGUF form has only leading dense layers",
        ));
    }
    plan.set(key(Key::ExpertWeightsNorm), Value::Bool(m.norm_topk));
    if m.routing.scale != 1.0 {
        plan.set(
            key(Key::ExpertWeightsScale),
            Value::F(m.routing.scale as f64),
        );
    }
    let gating = match m.routing.scoring {
        Scoring::Softmax => 1,
        Scoring::Sigmoid => 2,
        // llama.cpp's softmax over the chosen logits.
        Scoring::TopKSoftmax => 3,
    };
    plan.set(key(Key::ExpertGatingFunc), u(gating));
    if let Some(gr) = &m.routing.groups {
        plan.set(key(Key::ExpertGroupCount), u(gr.groups));
        plan.set(key(Key::ExpertGroupUsedCount), u(gr.top_groups));
    }
    Ok(())
}

/// Gemma's final norm is stored as w by transformers and as 1 + w by llama.cpp, like its
/// layer norms.
fn final_norm_transform(cfg: &ModelConfig, to_gguf: bool) -> Transform {
    if cfg.arch.is_gemma() {
        Transform::of(schema::Transform::AddOne, to_gguf)
    } else {
        Transform::None
    }
}

/// Reads the planned header back through the GGUF config reader and compares it with the
/// source config, so a model the GGUF keys cannot describe fails before any data is written.
fn check_round_trip(cfg: &ModelConfig, plan: &GgufPlan) -> Result<()> {
    let g = ModelConfig::from_gguf(plan)?;
    let mut diffs = Vec::new();
    macro_rules! same {
        ($($f:ident).+) => {
            if g.$($f).+ != cfg.$($f).+ {
                diffs.push(format!("{}: {:?} in the source, {:?} in GGUF", stringify!($($f).+), cfg.$($f).+, g.$($f).+));
            }
        };
    }
    same!(hidden_size);
    same!(intermediate_size);
    same!(num_layers);
    same!(num_heads);
    same!(num_kv_heads);
    same!(head_dim);
    same!(vocab_size);
    // llama.cpp runs Phi-3 without its sliding window; the key is written, and ignored.
    if cfg.arch != Arch::Phi3 {
        same!(layer_windows);
    } else if cfg.layer_windows.iter().any(Option::is_some) {
        tracing::warn!(
            "{}: llama.cpp runs Phi-3 without its sliding window, so past the window its output differs from transformers'",
            cfg.path.display()
        );
    }
    same!(rotary_dim);
    same!(tie_word_embeddings);
    same!(block.qkv_bias);
    same!(block.o_bias);
    same!(block.mlp_bias);
    same!(block.qk_norm);
    same!(block.sandwich_norms);
    same!(final_logit_softcap);
    same!(moe);
    if (g.rms_norm_eps - cfg.rms_norm_eps).abs() > 1e-6 * cfg.rms_norm_eps.max(1e-12) {
        same!(rms_norm_eps);
    }
    if (g.attn_scale - cfg.attn_scale).abs() > 1e-6 * cfg.attn_scale {
        same!(attn_scale);
    }
    // Llama 3.1 scaling travels as the rope_freqs tensor, so only the base is compared there.
    if g.rope.theta != cfg.rope.theta {
        same!(rope.theta);
    }
    match (&cfg.rope.scaling, &g.rope.scaling) {
        (RopeScaling::Llama3 { .. }, _) => {}
        // The factor sets travel as tensors.
        (
            RopeScaling::LongRope {
                original_max_position_embeddings: a,
                attention_factor: x,
                ..
            },
            RopeScaling::LongRope {
                original_max_position_embeddings: b,
                attention_factor: y,
                ..
            },
        ) if a == b && (x - y).abs() <= 1e-6 * x.abs() => {}
        // llama.cpp always rounds YaRN's band to whole dimensions (GPT-OSS's config says not
        // to): the file computes llama.cpp's function, slightly off the model's.
        (
            RopeScaling::Yarn {
                truncate: false, ..
            },
            RopeScaling::Yarn { truncate: true, .. },
        ) if {
            let mut t = cfg.rope.scaling.clone();
            if let RopeScaling::Yarn { truncate, .. } = &mut t {
                *truncate = true;
            }
            t == g.rope.scaling
        } =>
        {
            tracing::warn!(
                "{}: llama.cpp rounds YaRN's correction band to whole dimensions, which this model's config turns off; the GGUF file computes llama.cpp's function",
                cfg.path.display()
            );
        }
        _ => same!(rope.scaling),
    }
    if cfg.rope_local.is_some() {
        same!(rope_local);
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::file(
            &cfg.path,
            format!(
                "this model cannot be expressed in llama.cpp's GGUF keys: {}",
                diffs.join("; ")
            ),
        ))
    }
}

/// Rows of a matrix (or a whole vector) as f32, whatever its stored form.
fn read_f32(
    src: &dyn WeightSource,
    name: &str,
    shape: &[usize],
    start: usize,
    rows: usize,
) -> Result<Vec<f32>> {
    let vector = src.meta(name).is_some_and(|m| m.shape.len() == 1);
    if shape.len() == 1 || vector {
        return Ok(src.load(name, &Device::Cpu)?.flatten_all()?.to_vec1()?);
    }
    src.read_rows(name, start, rows, AlignedBuf::default())?
        .view()
        .to_f32()
}

impl Transform {
    fn apply(self, v: Vec<f32>, cols: usize) -> Vec<f32> {
        match self {
            Transform::None => v,
            Transform::Add(d) => v.into_iter().map(|x| x + d).collect(),
            Transform::Permute { head_dim, to_gguf } => {
                let half = head_dim / 2;
                let mut out = vec![0f32; v.len()];
                for (src, dst) in v
                    .chunks(head_dim * cols)
                    .zip(out.chunks_mut(head_dim * cols))
                {
                    for part in 0..2 {
                        for i in 0..half {
                            // transformers row part*half + i is llama.cpp row 2i + part.
                            let (hf, gg) = (part * half + i, 2 * i + part);
                            let (from, to) = if to_gguf { (hf, gg) } else { (gg, hf) };
                            dst[to * cols..(to + 1) * cols]
                                .copy_from_slice(&src[from * cols..(from + 1) * cols]);
                        }
                    }
                }
                out
            }
        }
    }
}

/// Encodes f32 rows in a GGUF tensor type.
fn encode(v: Vec<f32>, rows: usize, cols: usize, form: Form) -> Result<Vec<u8>> {
    if let Form::Mxfp4 { .. } = form {
        return Ok(crate::weights::mat::quantize_mxfp4(&v));
    }
    let form = match form {
        Form::F32 => Form::Q(GgmlDType::F32),
        Form::F16 => Form::Q(GgmlDType::F16),
        Form::BF16 => Form::Q(GgmlDType::BF16),
        f => f,
    };
    let Form::Q(t) = form else {
        return Err(Error::Internal(format!(
            "the converter does not write {}",
            form.name()
        )));
    };
    Ok(match t {
        GgmlDType::F32 => bytemuck::cast_slice(&v).to_vec(),
        GgmlDType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        GgmlDType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        q => {
            let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            QTensor::quantize(&t, q)?.data()?.into_owned()
        }
    })
}

/// Row ranges of about [`CHUNK_ELEMS`] values, a multiple of `align` rows each.
fn row_chunks(rows: usize, cols: usize, align: usize) -> Vec<(usize, usize)> {
    let per = (CHUNK_ELEMS / cols.max(1)).max(1);
    let per = (per / align).max(1) * align;
    (0..rows)
        .step_by(per)
        .map(|s| (s, per.min(rows - s)))
        .collect()
}

/// Rows and columns of an item, and whether it is a matrix.
fn dims(it: &Item) -> Result<(usize, usize, bool)> {
    match it.out.shape.as_slice() {
        [n] => Ok((1, *n, false)),
        [r, c] => Ok((*r, *c, true)),
        [e, r, c] => Ok((e * r, *c, true)),
        s => Err(Error::Invalid(format!(
            "tensor {} has {} dimensions; only vectors and matrices are converted",
            it.out.name,
            s.len()
        ))),
    }
}

/// A chunk of rows, read and transformed, waiting to be encoded; or already in the output's
/// form (MXFP4 copied as it is held).
struct Raw {
    item: usize,
    rows: usize,
    v: Vec<f32>,
    held: Option<Vec<u8>>,
}

/// Rows of an MXFP4 stack as held (which is GGUF's block layout), every row or every other
/// one from `first`, when the output keeps them as MXFP4; `None` otherwise.
fn held_mxfp4(
    src: &dyn WeightSource,
    it: &Item,
    start: usize,
    n: usize,
) -> Result<Option<Vec<u8>>> {
    let Form::Mxfp4 { .. } = it.out.form else {
        return Ok(None);
    };
    let (name, step, odd) = match &it.data {
        Data::Source(name) => (name, 1, 0),
        Data::Alternate(name, odd) => (name, 2, usize::from(*odd)),
        _ => return Ok(None),
    };
    if !matches!(src.form(name)?, Form::Mxfp4 { .. }) {
        return Ok(None);
    }
    let m = src.read_rows(name, step * start, step * n, AlignedBuf::default())?;
    let v = m.view();
    let rb = v.form.row_bytes(v.cols);
    Ok(Some(
        v.data
            .chunks_exact(rb)
            .skip(odd)
            .step_by(step)
            .flatten()
            .copied()
            .collect(),
    ))
}

/// Writes the items' data to `out` in order. A reader thread reads and transforms row chunks
/// ahead (a few chunks, bounded) while the chunks already read are encoded in parallel, so
/// the disk and the quantizer work at the same time. With `pad`, each tensor's data is padded to
/// GGUF's alignment.
fn stream_items(
    src: &dyn WeightSource,
    items: &[Item],
    pad: bool,
    out: &mut OutFile,
    progress: &mut dyn FnMut(u64, u64),
    total: u64,
) -> Result<()> {
    let shapes: Vec<(usize, usize, bool)> = items.iter().map(dims).collect::<Result<_>>()?;
    let group = rayon::current_num_threads().max(1);
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Raw>>(2 * group);
        let shapes_r = &shapes;
        s.spawn(move || {
            for (i, it) in items.iter().enumerate() {
                let (rows, cols, matrix) = shapes_r[i];
                let align = match (&it.data, it.transform) {
                    (Data::KvBPart(_, l, _) | Data::KvBJoin(_, _, l), _) => {
                        l.rows_per_head(&it.data)
                    }
                    (_, Transform::Permute { head_dim, .. }) => head_dim,
                    _ => 1,
                };
                let chunks = match &it.data {
                    // A chunk stays within one stacked matrix.
                    Data::Stack(names) => {
                        let per = rows / names.len().max(1);
                        (0..names.len())
                            .flat_map(|e| {
                                row_chunks(per, cols, align)
                                    .into_iter()
                                    .map(move |(s, n)| (e * per + s, n))
                            })
                            .collect()
                    }
                    _ if matrix => row_chunks(rows, cols, align),
                    _ => vec![(0, 1)],
                };
                for (start, n) in chunks {
                    let r = (|| -> Result<Raw> {
                        if let Some(bytes) = held_mxfp4(src, it, start, n)? {
                            return Ok(Raw {
                                item: i,
                                rows: n,
                                v: Vec::new(),
                                held: Some(bytes),
                            });
                        }
                        let v = match &it.data {
                            Data::Values(v) => v.clone(),
                            Data::Source(name) => read_f32(src, name, &it.out.shape, start, n)?,
                            Data::Rows(name, first) => {
                                read_f32(src, name, &it.out.shape, first + start, n)?
                            }
                            Data::Stack(names) => {
                                let per = rows / names.len().max(1);
                                let shape = [per, cols];
                                read_f32(src, &names[start / per], &shape, start % per, n)?
                            }
                            Data::KvBPart(_, l, _) | Data::KvBJoin(_, _, l) => {
                                let per = l.rows_per_head(&it.data);
                                l.heads(src, &it.data, start / per, n / per)?
                            }
                            Data::Alternate(name, odd) => {
                                // Output rows start..start+n are source rows 2r (+1).
                                let v = read_f32(src, name, &[2 * rows, cols], 2 * start, 2 * n)?;
                                v.chunks_exact(cols)
                                    .skip(usize::from(*odd))
                                    .step_by(2)
                                    .flatten()
                                    .copied()
                                    .collect()
                            }
                            Data::AlternateCols(name, odd) => {
                                let v = src.load(name, &Device::Cpu)?.flatten_all()?.to_vec1()?;
                                v.into_iter().skip(usize::from(*odd)).step_by(2).collect()
                            }
                        };
                        // Vectors are permuted as columns of one value each.
                        let v = it.transform.apply(v, if matrix { cols } else { 1 });
                        Ok(Raw {
                            item: i,
                            rows: if matrix { n } else { 1 },
                            v,
                            held: None,
                        })
                    })();
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            }
        });
        let mut cur = 0usize;
        let mut item_start = out.written();
        let finish = |out: &mut OutFile, i: usize, item_start: &mut u64| -> Result<()> {
            let got = out.written() - *item_start;
            if got != items[i].out.bytes() {
                return Err(Error::Internal(format!(
                    "tensor {} encoded to {got} bytes, planned {}",
                    items[i].out.name,
                    items[i].out.bytes()
                )));
            }
            if pad {
                out.pad()?;
            }
            *item_start = out.written();
            Ok(())
        };
        loop {
            let mut batch = Vec::with_capacity(group);
            while batch.len() < group {
                match rx.recv() {
                    Ok(r) => batch.push(r?),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let encoded: Vec<Result<(usize, Vec<u8>)>> = batch
                .into_par_iter()
                .map(|raw| {
                    let it = &items[raw.item];
                    let cols = shapes[raw.item].1;
                    Ok(match raw.held {
                        Some(bytes) => (raw.item, bytes),
                        None => (raw.item, encode(raw.v, raw.rows, cols, it.out.form)?),
                    })
                })
                .collect();
            for e in encoded {
                let (i, bytes) = e?;
                while cur < i {
                    finish(out, cur, &mut item_start)?;
                    cur += 1;
                }
                out.write(&bytes)?;
                progress(out.written(), total);
            }
        }
        while cur < items.len() {
            finish(out, cur, &mut item_start)?;
            cur += 1;
        }
        Ok(())
    })
}

fn write_gguf(
    info: &ModelInfo,
    plan: &GgufPlan,
    items: &[Item],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let total = plan.file_bytes();
    let mut out = OutFile::create(&plan.path, total)?;
    out.write(&plan.header())?;
    stream_items(info.src.as_ref(), items, true, &mut out, progress, total)?;
    out.commit()
}

/// Converts a GGUF file to a Hugging Face folder of f32 safetensors at `out`, with config,
/// tokenizer and chat template, undoing llama.cpp's layout changes.
pub fn to_hf(src: &Path, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    if !crate::weights::is_gguf(src) {
        return Err(Error::file(
            src,
            "is not a GGUF file; dequantizing takes a .gguf",
        ));
    }
    let info = ModelInfo::open_with(src, true)?;
    if info.cfg.arch == Arch::GptOss {
        // transformers keeps GPT-OSS's experts stacked, gate and up interleaved and each
        // transposed: a layout of its own that this writer does not produce.
        return Err(Error::file(
            src,
            "a GPT-OSS GGUF file cannot be written back as a transformers folder by this version; run the .gguf itself",
        ));
    }
    crate::util::write_folder(out, |tmp| write_hf(&info, tmp, progress))
}

fn write_hf(info: &ModelInfo, dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let cfg = &info.cfg;
    let src = info.src.as_ref();
    let mut items: Vec<(String, Item)> = Vec::new();
    // Latent attention's kv_b_proj, joined from llama.cpp's split form.
    let mut joins: Vec<(String, Item)> = Vec::new();
    let mut push = |hf: String, gg: String, first: Option<(usize, Vec<usize>)>, transform| {
        let Some(m) = src.meta(&gg) else { return };
        let (shape, data) = match first {
            // One expert's rows of a GGUF stack.
            Some((row, shape)) => (shape, Data::Rows(gg, row)),
            None => (m.shape, Data::Source(gg)),
        };
        items.push((
            hf.clone(),
            Item {
                out: TensorPlan {
                    name: hf,
                    shape,
                    form: Form::of_ggml(GgmlDType::F32),
                },
                data,
                transform,
            },
        ));
    };
    push(
        Naming::Hf.embed().into(),
        Naming::Gguf.embed().into(),
        None,
        Transform::None,
    );
    for l in 0..cfg.num_layers {
        for t in &LayerSchema::new(cfg, l).tensors {
            let transform = Transform::of(t.transform, false);
            if t.kind == Kind::Expert {
                for e in 0..t.experts {
                    let (gg, row) = t.expert_name(Naming::Gguf, l, e);
                    let hf = t.expert_name(Naming::Hf, l, e).0;
                    push(hf, gg, Some((row, t.shape.clone())), transform);
                }
                continue;
            }
            if let (Role::KB, Some(lat)) = (t.role, Latent::of(cfg)) {
                // llama.cpp's split kv_b, joined back into transformers' one matrix.
                let kb = t.name(Naming::Gguf, l);
                let vb = LayerSchema::new(cfg, l)
                    .get(Role::VB)
                    .map(|v| v.name(Naming::Gguf, l))
                    .ok_or_else(|| Error::Internal("attn_k_b without attn_v_b".into()))?;
                let mut joined = cfg.clone();
                joined.block.kv_b_split = false;
                let hf = LayerSchema::new(&joined, l)
                    .get(Role::KvB)
                    .map(|k| k.name(Naming::Hf, l))
                    .ok_or_else(|| Error::Internal("no kv_b_proj in a latent layer".into()))?;
                let shape = vec![lat.heads * (lat.nope + lat.v), lat.rank];
                joins.push((
                    hf.clone(),
                    Item {
                        out: TensorPlan {
                            name: hf,
                            shape,
                            form: Form::of_ggml(GgmlDType::F32),
                        },
                        data: Data::KvBJoin(kb, vb, lat),
                        transform: Transform::None,
                    },
                ));
                continue;
            }
            if t.role == Role::VB {
                continue;
            }
            // transformers keeps 1-row vectors (Qwen2-MoE's shared-expert gate) 2-D.
            let shape = (t.is_small() && t.shape.len() > 1).then(|| (0, t.shape.clone()));
            push(
                t.name(Naming::Hf, l),
                t.name(Naming::Gguf, l),
                shape,
                transform,
            );
        }
    }
    push(
        Naming::Hf.final_norm().into(),
        Naming::Gguf.final_norm().into(),
        None,
        final_norm_transform(cfg, false),
    );
    if !cfg.tie_word_embeddings {
        push(
            Naming::Hf.head().into(),
            Naming::Gguf.head().into(),
            None,
            Transform::None,
        );
    }
    items.extend(joins);
    if src.meta(Naming::GGUF_ROPE_FREQS).is_some() {
        return Err(Error::file(
            &info.dir,
            "rope_freqs (Llama 3.1 rescaling) cannot be written back as a transformers config yet",
        ));
    }

    // A single safetensors file: header, then each tensor's f32 data in order.
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, it) in &items {
        let b = it.out.bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": it.out.shape, "data_offsets": [off, off + b]}),
        );
        off += b;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let total = 8 + h.len() as u64 + off;
    let mut out = OutFile::create(&dir.join("model.safetensors"), total)?;
    out.write(&(h.len() as u64).to_le_bytes())?;
    out.write(&h)?;
    let items: Vec<Item> = items.into_iter().map(|(_, it)| it).collect();
    stream_items(src, &items, false, &mut out, progress, total)?;
    out.commit()?;
    tokenizer::write_hf_files(&info.dir, cfg, dir)
}

/// Key under which a cached conversion records the source it was made from.
const SOURCE_KEY: &str = "airllm.source";

/// Where `--compress` keeps conversions when no `--cache-dir` is given.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("AIRLLM_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
            })
            .join("airllm/compressed"),
    }
}

/// A description of the source folder's files (name, size, modification time) that changes
/// whenever a file is rewritten, replaced, added or removed.
fn source_stamp(src: &Path) -> Result<String> {
    let canon = src
        .canonicalize()
        .map_err(|e| Error::file(src, format!("cannot resolve: {e}")))?;
    let rd =
        std::fs::read_dir(&canon).map_err(|e| Error::file(&canon, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let keep = [".safetensors", ".json", ".jinja", ".model"]
            .iter()
            .any(|x| name.ends_with(x));
        if !keep {
            continue;
        }
        let m = e
            .metadata()
            .map_err(|err| Error::file(e.path(), format!("cannot stat: {err}")))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push(serde_json::json!([name, m.len(), mtime.to_string()]));
    }
    files.sort_by_key(|f| f[0].as_str().unwrap_or("").to_string());
    Ok(serde_json::json!({"path": canon, "files": files}).to_string())
}

/// The GGUF conversion of the Hugging Face folder `src` at `quant`, made on first use in
/// `cache_dir` and reused while the source files are unchanged. Returns the file and whether
/// it was (re)built.
pub fn cached(
    src: &Path,
    quant: Quant,
    cache_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, bool)> {
    if crate::weights::is_gguf(src) {
        return Err(Error::file(
            src,
            "is already a GGUF file; compression applies to Hugging Face folders",
        ));
    }
    let stamp = source_stamp(src)?;
    let canon = src.canonicalize().unwrap_or_else(|_| src.to_path_buf());
    let h = crate::util::fnv1a64(canon.to_string_lossy().as_bytes());
    let name = canon
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    let dir = cache_dir.join(format!("{name}-{h:016x}"));
    let file = dir.join(format!("{}.gguf", quant.name()));
    if file.exists() {
        let fresh = crate::weights::gguf::GgufFile::open(&file)
            .ok()
            .and_then(|g| {
                g.get(SOURCE_KEY)
                    .and_then(Value::as_str)
                    .map(|s| s == stamp)
            })
            .unwrap_or(false);
        if fresh {
            return Ok((file, false));
        }
        tracing::info!("{}: source changed, converting again", file.display());
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, format!("cannot create: {e}")))?;
    to_gguf(
        src,
        quant,
        &file,
        &[(SOURCE_KEY.to_string(), Value::Str(stamp))],
        progress,
    )?;
    Ok((file, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let (hd, cols) = (8, 3);
        let v: Vec<f32> = (0..2 * hd * cols).map(|i| i as f32).collect();
        let g = Transform::Permute {
            head_dim: hd,
            to_gguf: true,
        }
        .apply(v.clone(), cols);
        // transformers row 1 (first half, i = 1) becomes llama.cpp row 2.
        assert_eq!(&g[2 * cols..3 * cols], &v[cols..2 * cols]);
        // transformers row hd/2 (second half, i = 0) becomes llama.cpp row 1.
        assert_eq!(&g[cols..2 * cols], &v[hd / 2 * cols..(hd / 2 + 1) * cols]);
        let back = Transform::Permute {
            head_dim: hd,
            to_gguf: false,
        }
        .apply(g, cols);
        assert_eq!(back, v);
    }

    #[test]
    fn unfit_rows_fall_back_like_llama_cpp() {
        assert_eq!(matrix_type(Quant::Q4K, 640, false, false), GgmlDType::Q5_0);
        assert_eq!(matrix_type(Quant::Q4K, 2048, false, false), GgmlDType::Q4K);
        assert_eq!(matrix_type(Quant::Q4K, 2048, true, false), GgmlDType::Q6K);
        assert_eq!(matrix_type(Quant::Q4K, 640, true, false), GgmlDType::Q8_0);
        assert_eq!(matrix_type(Quant::Q4K, 2048, false, true), GgmlDType::Q4K);
        assert_eq!(matrix_type(Quant::Q4KM, 2048, false, true), GgmlDType::Q6K);
        assert_eq!(matrix_type(Quant::Q8_0, 40, false, false), GgmlDType::F16);
    }
}

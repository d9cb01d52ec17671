//! The one layer schema: every tensor a decoder layer can have, with its role, group, kind,
//! shape (from the config), Hugging Face name, GGUF name and the transform between the two
//! formats. The engine, the streamer, the size accounting, the validator and the converter all
//! read this table, so adding a tensor to an architecture is one edit here.

use crate::config::{Arch, BlockSpec, ModelConfig};

/// What a layer tensor does in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    QNorm,
    KNorm,
    /// Norm before the MLP.
    MlpNorm,
    /// Gemma 3: norm of the attention output, before the residual add.
    PostAttnNorm,
    /// Gemma 3: norm of the MLP output, before the residual add.
    PostMlpNorm,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// The part of the block a tensor belongs to (attention, MLP; later router and experts), so
/// that streaming and expert routing can work on groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Attention,
    Mlp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `[out, in]` projection: held in the file's form, streamed in row slices.
    Matrix,
    /// An RMSNorm weight (f32 in memory; Gemma's +1 offset applies).
    Norm,
    /// A projection bias (f32 in memory).
    Bias,
}

/// How a tensor's stored values differ between the Hugging Face and GGUF forms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    None,
    /// Llama/Mistral q/k rows: transformers' half-split RoPE layout against llama.cpp's
    /// interleaved pairs, per head of `head_dim` rows.
    Permute {
        head_dim: usize,
    },
    /// Gemma norms: transformers stores w and computes (1 + w); GGUF stores 1 + w.
    AddOne,
}

/// The two naming schemes tensors come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Hugging Face transformers (`model.layers.N.self_attn.q_proj.weight`).
    Hf,
    /// llama.cpp GGUF (`blk.N.attn_q.weight`).
    Gguf,
}

/// Sizes a tensor's shape is made from.
struct Dims {
    h: usize,
    q: usize,
    kv: usize,
    hd: usize,
    im: usize,
}

/// One row of the table.
struct Entry {
    role: Role,
    group: Group,
    kind: Kind,
    hf: &'static str,
    gguf: &'static str,
    shape: fn(&Dims) -> Vec<usize>,
    /// Whether a block with these options has the tensor.
    when: fn(&BlockSpec) -> bool,
}

const fn e(
    role: Role,
    group: Group,
    kind: Kind,
    hf: &'static str,
    gguf: &'static str,
    shape: fn(&Dims) -> Vec<usize>,
    when: fn(&BlockSpec) -> bool,
) -> Entry {
    Entry {
        role,
        group,
        kind,
        hf,
        gguf,
        shape,
        when,
    }
}

use Group::{Attention as A, Mlp as M};
use Kind::{Bias, Matrix, Norm};

/// Every layer tensor, in the order the block uses them (which is also the order the
/// converter lays them out and the streamer reads them).
#[rustfmt::skip]
const TABLE: &[Entry] = &[
    e(Role::AttnNorm, A, Norm, "input_layernorm.weight", "attn_norm.weight", |d| vec![d.h], |_| true),
    e(Role::Q, A, Matrix, "self_attn.q_proj.weight", "attn_q.weight", |d| vec![d.q, d.h], |_| true),
    e(Role::QBias, A, Bias, "self_attn.q_proj.bias", "attn_q.bias", |d| vec![d.q], |b| b.qkv_bias),
    e(Role::K, A, Matrix, "self_attn.k_proj.weight", "attn_k.weight", |d| vec![d.kv, d.h], |_| true),
    e(Role::KBias, A, Bias, "self_attn.k_proj.bias", "attn_k.bias", |d| vec![d.kv], |b| b.qkv_bias),
    e(Role::V, A, Matrix, "self_attn.v_proj.weight", "attn_v.weight", |d| vec![d.kv, d.h], |_| true),
    e(Role::VBias, A, Bias, "self_attn.v_proj.bias", "attn_v.bias", |d| vec![d.kv], |b| b.qkv_bias),
    e(Role::QNorm, A, Norm, "self_attn.q_norm.weight", "attn_q_norm.weight", |d| vec![d.hd], |b| b.qk_norm),
    e(Role::KNorm, A, Norm, "self_attn.k_norm.weight", "attn_k_norm.weight", |d| vec![d.hd], |b| b.qk_norm),
    e(Role::O, A, Matrix, "self_attn.o_proj.weight", "attn_output.weight", |d| vec![d.h, d.q], |_| true),
    e(Role::OBias, A, Bias, "self_attn.o_proj.bias", "attn_output.bias", |d| vec![d.h], |b| b.o_bias),
    // In transformers' names Gemma 3's attention-output norm takes the name Llama uses for its
    // pre-MLP norm.
    e(Role::PostAttnNorm, A, Norm, "post_attention_layernorm.weight", "post_attention_norm.weight", |d| vec![d.h], |b| b.sandwich_norms),
    e(Role::MlpNorm, M, Norm, "pre_feedforward_layernorm.weight", "ffn_norm.weight", |d| vec![d.h], |b| b.sandwich_norms),
    e(Role::MlpNorm, M, Norm, "post_attention_layernorm.weight", "ffn_norm.weight", |d| vec![d.h], |b| !b.sandwich_norms),
    e(Role::Gate, M, Matrix, "mlp.gate_proj.weight", "ffn_gate.weight", |d| vec![d.im, d.h], |_| true),
    e(Role::GateBias, M, Bias, "mlp.gate_proj.bias", "ffn_gate.bias", |d| vec![d.im], |b| b.mlp_bias),
    e(Role::Up, M, Matrix, "mlp.up_proj.weight", "ffn_up.weight", |d| vec![d.im, d.h], |_| true),
    e(Role::UpBias, M, Bias, "mlp.up_proj.bias", "ffn_up.bias", |d| vec![d.im], |b| b.mlp_bias),
    e(Role::Down, M, Matrix, "mlp.down_proj.weight", "ffn_down.weight", |d| vec![d.h, d.im], |_| true),
    e(Role::DownBias, M, Bias, "mlp.down_proj.bias", "ffn_down.bias", |d| vec![d.h], |b| b.mlp_bias),
    e(Role::PostMlpNorm, M, Norm, "post_feedforward_layernorm.weight", "post_ffw_norm.weight", |d| vec![d.h], |b| b.sandwich_norms),
];

/// One tensor of a layer, as a given model has it.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub role: Role,
    pub group: Group,
    pub kind: Kind,
    pub shape: Vec<usize>,
    hf: &'static str,
    gguf: &'static str,
    pub transform: Transform,
}

impl TensorSpec {
    /// The tensor's name in layer `layer` under `naming`.
    pub fn name(&self, naming: Naming, layer: usize) -> String {
        match naming {
            Naming::Hf => format!("model.layers.{layer}.{}", self.hf),
            Naming::Gguf => format!("blk.{layer}.{}", self.gguf),
        }
    }
    /// Whether the tensor is a norm or bias (small, f32 in memory).
    pub fn is_small(&self) -> bool {
        self.kind != Kind::Matrix
    }
}

/// The GGUF name of `role` in layer `layer`, for reading a file's options from which tensors
/// it has (before the config, and so the schema, exists).
pub fn gguf_name(layer: usize, role: Role) -> String {
    let t = TABLE.iter().find(|t| t.role == role).expect("every role");
    format!("blk.{layer}.{}", t.gguf)
}

/// The tensors of one decoder layer of a model, in execution order.
#[derive(Debug, Clone)]
pub struct LayerSchema {
    pub tensors: Vec<TensorSpec>,
}

impl LayerSchema {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = Dims {
            h: cfg.hidden_size,
            q: cfg.num_heads * cfg.head_dim,
            kv: cfg.num_kv_heads * cfg.head_dim,
            hd: cfg.head_dim,
            im: cfg.intermediate_size,
        };
        let permute = matches!(cfg.arch, Arch::Llama | Arch::Mistral);
        let tensors = TABLE
            .iter()
            .filter(|t| (t.when)(&cfg.block))
            .map(|t| TensorSpec {
                role: t.role,
                group: t.group,
                kind: t.kind,
                shape: (t.shape)(&d),
                hf: t.hf,
                gguf: t.gguf,
                transform: match (t.kind, t.role) {
                    // transformers stores Gemma's norms as w, llama.cpp as 1 + w. (Not the
                    // block's norm offset: a config read from GGUF has none.)
                    (Kind::Norm, _) if cfg.arch.is_gemma() => Transform::AddOne,
                    (_, Role::Q | Role::K | Role::QBias | Role::KBias) if permute => {
                        Transform::Permute {
                            head_dim: cfg.head_dim,
                        }
                    }
                    _ => Transform::None,
                },
            })
            .collect();
        LayerSchema { tensors }
    }

    pub fn get(&self, role: Role) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.role == role)
    }

    /// The matrices, in execution order.
    pub fn matrices(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.kind == Kind::Matrix)
    }

    /// The norms and biases, in execution order.
    pub fn small(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.is_small())
    }
}

/// Names of the tensors outside the layers.
impl Naming {
    pub fn embed(self) -> &'static str {
        match self {
            Naming::Hf => HF_EMBED,
            Naming::Gguf => "token_embd.weight",
        }
    }
    pub fn final_norm(self) -> &'static str {
        match self {
            Naming::Hf => HF_FINAL_NORM,
            Naming::Gguf => "output_norm.weight",
        }
    }
    pub fn head(self) -> &'static str {
        match self {
            Naming::Hf => HF_LM_HEAD,
            Naming::Gguf => "output.weight",
        }
    }
}

pub const HF_EMBED: &str = "model.embed_tokens.weight";
pub const HF_FINAL_NORM: &str = "model.norm.weight";
pub const HF_LM_HEAD: &str = "lm_head.weight";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_unique_per_model() {
        for sandwich in [false, true] {
            let mut b = BlockSpec::plain();
            b.sandwich_norms = sandwich;
            b.qkv_bias = true;
            b.mlp_bias = true;
            b.o_bias = true;
            b.qk_norm = true;
            let roles: Vec<Role> = TABLE
                .iter()
                .filter(|t| (t.when)(&b))
                .map(|t| t.role)
                .collect();
            let mut dedup = roles.clone();
            dedup.sort_by_key(|r| format!("{r:?}"));
            dedup.dedup();
            assert_eq!(roles.len(), dedup.len(), "sandwich {sandwich}");
        }
    }
}

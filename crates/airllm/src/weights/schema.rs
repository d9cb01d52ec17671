//! The one layer schema: every tensor a decoder layer can have, with its role, group, kind,
//! shape (from the config), Hugging Face name, GGUF name and the transform between the two
//! formats. The engine, the streamer, the size accounting, the validator and the converter all
//! read this table, so adding a tensor to an architecture is one edit here.

use crate::config::{BlockSpec, ModelConfig, MoeStyle};

/// What a layer tensor does in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    AttnNorm,
    /// q, k and v in one matrix (Phi-3), rows in that order.
    Qkv,
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
    /// gate and up in one matrix (Phi-3), gate rows first.
    GateUp,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
    /// The MoE router: `[experts, hidden]`.
    Router,
    /// One expert's gate, up and down projections (one tensor per expert in transformers, one
    /// `[experts, rows, cols]` tensor per layer in GGUF).
    ExpertGate,
    ExpertUp,
    ExpertDown,
    /// Qwen2-MoE's shared expert and its sigmoid gate `[1, hidden]`.
    SharedGate,
    SharedUp,
    SharedDown,
    SharedExpertGate,
    /// DeepSeek's `e_score_correction_bias` `[experts]`, added to the scores for the choice.
    RouterBias,
    /// Latent attention: the query bottleneck and its norm, its expansion to the heads.
    QA,
    QANorm,
    QB,
    /// The joint latent and RoPE key `[kv_lora_rank + rope, hidden]`, the latent's norm, and
    /// its per-head expansion to keys and values `[heads · (nope + v), kv_lora_rank]`.
    KvA,
    KvANorm,
    KvB,
    /// `kv_b_proj` as llama.cpp's converter splits it for the absorbed form: per head, the
    /// key part transposed (`[rank, nope]`) and the value part (`[v, rank]`), stacked over
    /// the heads (GGUF only).
    KB,
    VB,
    /// GPT-OSS: each head's sink logit `[heads]`, which joins its softmax's denominator.
    Sinks,
    /// GPT-OSS: the router's own bias `[experts]`, added to its logits.
    RouterLogitBias,
    /// GPT-OSS in transformers' layout: an expert's gate and up rows interleaved in one
    /// matrix (gate row j is row 2j, up row j is row 2j + 1), and its bias `[experts, 2·width]`.
    ExpertGateUp,
    ExpertGateUpBias,
    /// GPT-OSS: the experts' biases, `[experts, rows]` for a layer.
    ExpertGateBias,
    ExpertUpBias,
    ExpertDownBias,
    /// Gated DeltaNet (Qwen3-Next): q, k, v and z in one matrix, grouped by key head (each
    /// head's q, k, then its value heads' v and z), and b and a likewise.
    LinQkvz,
    LinBa,
    /// Gated DeltaNet (Qwen3.5): q, k and v (each over all heads) in one matrix; z, b and a
    /// in their own.
    LinQkv,
    LinZ,
    LinB,
    LinA,
    /// The short causal convolution over q, k and v `[channels, 1, kernel]`, the decay's
    /// `A_log` and `dt_bias` `[value heads]`, and the gated output norm `[value_dim]` (a
    /// plain scale, not Qwen's 1 + w).
    LinConv,
    LinALog,
    LinDtBias,
    LinNorm,
}

/// The part of the block a tensor belongs to (attention, MLP; later router and experts), so
/// that streaming and expert routing can work on groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Attention,
    Mlp,
    /// The router and the shared expert: read with the attention, before routing.
    Router,
    /// The routed experts: read only when routing picks them.
    Experts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `[out, in]` projection: held in the file's form, streamed in row slices.
    Matrix,
    /// An RMSNorm weight (f32 in memory; Gemma's +1 offset applies).
    Norm,
    /// A projection bias (f32 in memory).
    Bias,
    /// One expert's `[out, in]` projection, held in the expert cache when routing picks it.
    Expert,
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
    /// Experts, an expert's width, the shared expert's width.
    ne: usize,
    ex: usize,
    sh: usize,
    /// Attention output width (heads × v_head_dim).
    o: usize,
    /// Latent attention: query rank, latent rank, RoPE key width, rows of `kv_b_proj`,
    /// heads, and a head's key (nope) and value widths.
    qr: usize,
    kr: usize,
    rope: usize,
    kvb: usize,
    nh: usize,
    nope: usize,
    vd: usize,
    /// Rows of `q_proj`: the queries, and as many gate rows with an output gate.
    qg: usize,
    /// Gated DeltaNet: all key heads' width, all value heads' width, value heads, conv
    /// channels and kernel, one value head's width.
    lk: usize,
    lv: usize,
    lnv: usize,
    lc: usize,
    lkern: usize,
    ldv: usize,
}

/// What a layer's MLP is: the options an entry's `when` tests besides the block's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMlp {
    Dense,
    /// `gated`: the shared expert has a sigmoid gate; `bias`: the router has a correction bias.
    Sparse {
        style: MoeStyle,
        shared: bool,
        gated: bool,
        bias: bool,
    },
}

/// What an entry's `when` tests of one layer besides the block's options: its MLP, and
/// whether its attention is Gated DeltaNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOpts {
    pub mlp: LayerMlp,
    pub linear: bool,
    /// Gated DeltaNet's projections come fused (Qwen3-Next) rather than four (Qwen3.5).
    pub fused_linear: bool,
}

impl LayerOpts {
    fn sparse(self) -> bool {
        self.mlp != LayerMlp::Dense
    }
    fn style(self, s: MoeStyle) -> bool {
        matches!(self.mlp, LayerMlp::Sparse { style, .. } if style == s)
    }
    fn shared(self) -> bool {
        matches!(self.mlp, LayerMlp::Sparse { shared: true, .. })
    }
    fn gated(self) -> bool {
        matches!(self.mlp, LayerMlp::Sparse { gated: true, .. })
    }
    fn bias(self) -> bool {
        matches!(self.mlp, LayerMlp::Sparse { bias: true, .. })
    }
    /// Softmax attention (with a KV cache), not Gated DeltaNet.
    fn attn(self) -> bool {
        !self.linear
    }
}

/// One row of the table.
struct Entry {
    role: Role,
    group: Group,
    kind: Kind,
    hf: &'static str,
    gguf: &'static str,
    shape: fn(&Dims) -> Vec<usize>,
    /// Whether a layer with these options has the tensor.
    when: fn(&BlockSpec, LayerOpts) -> bool,
}

const fn e(
    role: Role,
    group: Group,
    kind: Kind,
    hf: &'static str,
    gguf: &'static str,
    shape: fn(&Dims) -> Vec<usize>,
    when: fn(&BlockSpec, LayerOpts) -> bool,
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

use Group::{Attention as A, Experts as X, Mlp as M, Router as R};
use Kind::{Bias, Expert, Matrix, Norm};
use MoeStyle::{Deepseek as DS, GptOss as GO, Mixtral as MX, Qwen as QW};

/// Every layer tensor, in the order the block uses them (which is also the order the
/// converter lays them out and the streamer reads them).
#[rustfmt::skip]
const TABLE: &[Entry] = &[
    e(Role::AttnNorm, A, Norm, "input_layernorm.weight", "attn_norm.weight", |d| vec![d.h], |_, _| true),
    e(Role::Qkv, A, Matrix, "self_attn.qkv_proj.weight", "attn_qkv.weight", |d| vec![d.q + 2 * d.kv, d.h], |b, m| m.attn() && b.fused_qkv),
    e(Role::Q, A, Matrix, "self_attn.q_proj.weight", "attn_q.weight", |d| vec![d.qg, d.h], |b, m| m.attn() && !b.fused_qkv && !b.q_lora),
    e(Role::QBias, A, Bias, "self_attn.q_proj.bias", "attn_q.bias", |d| vec![d.qg], |b, m| m.attn() && b.qkv_bias),
    e(Role::QA, A, Matrix, "self_attn.q_a_proj.weight", "attn_q_a.weight", |d| vec![d.qr, d.h], |b, m| m.attn() && b.q_lora),
    e(Role::QANorm, A, Norm, "self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight", |d| vec![d.qr], |b, m| m.attn() && b.q_lora),
    e(Role::QB, A, Matrix, "self_attn.q_b_proj.weight", "attn_q_b.weight", |d| vec![d.q, d.qr], |b, m| m.attn() && b.q_lora),
    e(Role::KvA, A, Matrix, "self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight", |d| vec![d.kr + d.rope, d.h], |b, m| m.attn() && b.mla),
    e(Role::KvANorm, A, Norm, "self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight", |d| vec![d.kr], |b, m| m.attn() && b.mla),
    e(Role::KvB, A, Matrix, "self_attn.kv_b_proj.weight", "attn_kv_b.weight", |d| vec![d.kvb, d.kr], |b, m| m.attn() && b.mla && !b.kv_b_split),
    e(Role::KB, A, Matrix, "self_attn.k_b_proj.weight", "attn_k_b.weight", |d| vec![d.nh * d.kr, d.nope], |b, m| m.attn() && b.mla && b.kv_b_split),
    e(Role::VB, A, Matrix, "self_attn.v_b_proj.weight", "attn_v_b.weight", |d| vec![d.nh * d.vd, d.kr], |b, m| m.attn() && b.mla && b.kv_b_split),
    e(Role::K, A, Matrix, "self_attn.k_proj.weight", "attn_k.weight", |d| vec![d.kv, d.h], |b, m| m.attn() && !b.fused_qkv && !b.mla),
    e(Role::KBias, A, Bias, "self_attn.k_proj.bias", "attn_k.bias", |d| vec![d.kv], |b, m| m.attn() && b.qkv_bias),
    e(Role::V, A, Matrix, "self_attn.v_proj.weight", "attn_v.weight", |d| vec![d.kv, d.h], |b, m| m.attn() && !b.fused_qkv && !b.mla),
    e(Role::VBias, A, Bias, "self_attn.v_proj.bias", "attn_v.bias", |d| vec![d.kv], |b, m| m.attn() && b.qkv_bias),
    e(Role::QNorm, A, Norm, "self_attn.q_norm.weight", "attn_q_norm.weight", |d| vec![d.hd], |b, m| m.attn() && b.qk_norm),
    e(Role::KNorm, A, Norm, "self_attn.k_norm.weight", "attn_k_norm.weight", |d| vec![d.hd], |b, m| m.attn() && b.qk_norm),
    e(Role::O, A, Matrix, "self_attn.o_proj.weight", "attn_output.weight", |d| vec![d.h, d.o], |_, m| m.attn()),
    e(Role::OBias, A, Bias, "self_attn.o_proj.bias", "attn_output.bias", |d| vec![d.h], |b, m| m.attn() && b.o_bias),
    // Gated DeltaNet in place of attention. llama.cpp's names for Qwen3-Next.
    e(Role::LinQkvz, A, Matrix, "linear_attn.in_proj_qkvz.weight", "ssm_in.weight", |d| vec![2 * d.lk + 2 * d.lv, d.h], |_, m| m.linear && m.fused_linear),
    e(Role::LinBa, A, Matrix, "linear_attn.in_proj_ba.weight", "ssm_ba.weight", |d| vec![2 * d.lnv, d.h], |_, m| m.linear && m.fused_linear),
    e(Role::LinQkv, A, Matrix, "linear_attn.in_proj_qkv.weight", "attn_qkv.weight", |d| vec![2 * d.lk + d.lv, d.h], |_, m| m.linear && !m.fused_linear),
    e(Role::LinZ, A, Matrix, "linear_attn.in_proj_z.weight", "attn_gate.weight", |d| vec![d.lv, d.h], |_, m| m.linear && !m.fused_linear),
    e(Role::LinB, A, Matrix, "linear_attn.in_proj_b.weight", "ssm_beta.weight", |d| vec![d.lnv, d.h], |_, m| m.linear && !m.fused_linear),
    e(Role::LinA, A, Matrix, "linear_attn.in_proj_a.weight", "ssm_alpha.weight", |d| vec![d.lnv, d.h], |_, m| m.linear && !m.fused_linear),
    e(Role::LinConv, A, Bias, "linear_attn.conv1d.weight", "ssm_conv1d.weight", |d| vec![d.lc, 1, d.lkern], |_, m| m.linear),
    e(Role::LinALog, A, Bias, "linear_attn.A_log", "ssm_a", |d| vec![d.lnv], |_, m| m.linear),
    e(Role::LinDtBias, A, Bias, "linear_attn.dt_bias", "ssm_dt.bias", |d| vec![d.lnv], |_, m| m.linear),
    e(Role::LinNorm, A, Bias, "linear_attn.norm.weight", "ssm_norm.weight", |d| vec![d.ldv], |_, m| m.linear),
    e(Role::O, A, Matrix, "linear_attn.out_proj.weight", "ssm_out.weight", |d| vec![d.h, d.lv], |_, m| m.linear),
    // In transformers' names Gemma 3's attention-output norm takes the name Llama uses for its
    // pre-MLP norm.
    e(Role::PostAttnNorm, A, Norm, "post_attention_layernorm.weight", "post_attention_norm.weight", |d| vec![d.h], |b, _| b.sandwich_norms && !b.glm_norms),
    e(Role::Sinks, A, Bias, "self_attn.sinks", "attn_sinks.weight", |d| vec![d.nh], |b, m| m.attn() && b.sinks),
    e(Role::PostAttnNorm, A, Norm, "post_self_attn_layernorm.weight", "post_attention_norm.weight", |d| vec![d.h], |b, _| b.glm_norms),
    e(Role::MlpNorm, M, Norm, "pre_feedforward_layernorm.weight", "ffn_norm.weight", |d| vec![d.h], |b, _| b.sandwich_norms && !b.glm_norms),
    e(Role::MlpNorm, M, Norm, "post_attention_layernorm.weight", "ffn_norm.weight", |d| vec![d.h], |b, _| (!b.sandwich_norms || b.glm_norms) && !b.mlp_norm_post_attention),
    e(Role::MlpNorm, M, Norm, "post_attention_layernorm.weight", "post_attention_norm.weight", |d| vec![d.h], |b, _| b.mlp_norm_post_attention),
    e(Role::GateUp, M, Matrix, "mlp.gate_up_proj.weight", "ffn_up.weight", |d| vec![2 * d.im, d.h], |b, m| b.fused_gate_up && !m.sparse()),
    e(Role::Gate, M, Matrix, "mlp.gate_proj.weight", "ffn_gate.weight", |d| vec![d.im, d.h], |b, m| !b.fused_gate_up && !m.sparse()),
    e(Role::GateBias, M, Bias, "mlp.gate_proj.bias", "ffn_gate.bias", |d| vec![d.im], |b, m| b.mlp_bias && !m.sparse()),
    e(Role::Up, M, Matrix, "mlp.up_proj.weight", "ffn_up.weight", |d| vec![d.im, d.h], |b, m| !b.fused_gate_up && !m.sparse()),
    e(Role::UpBias, M, Bias, "mlp.up_proj.bias", "ffn_up.bias", |d| vec![d.im], |b, m| b.mlp_bias && !m.sparse()),
    e(Role::Down, M, Matrix, "mlp.down_proj.weight", "ffn_down.weight", |d| vec![d.h, d.im], |_, m| !m.sparse()),
    e(Role::DownBias, M, Bias, "mlp.down_proj.bias", "ffn_down.bias", |d| vec![d.h], |b, m| b.mlp_bias && !m.sparse()),
    e(Role::Router, R, Matrix, "block_sparse_moe.gate.weight", "ffn_gate_inp.weight", |d| vec![d.ne, d.h], |_, m| m.style(MX)),
    e(Role::Router, R, Matrix, "mlp.gate.weight", "ffn_gate_inp.weight", |d| vec![d.ne, d.h], |_, m| m.style(QW) || m.style(DS)),
    e(Role::Router, R, Matrix, "mlp.router.weight", "ffn_gate_inp.weight", |d| vec![d.ne, d.h], |_, m| m.style(GO)),
    e(Role::RouterLogitBias, R, Bias, "mlp.router.bias", "ffn_gate_inp.bias", |d| vec![d.ne], |_, m| m.style(GO)),
    e(Role::ExpertGateUpBias, R, Bias, "mlp.experts.gate_up_proj_bias", "ffn_gate_up_exps.bias", |d| vec![d.ne, 2 * d.ex], |b, m| m.style(GO) && b.gate_up_interleaved),
    e(Role::ExpertGateBias, R, Bias, "mlp.experts.gate_proj_bias", "ffn_gate_exps.bias", |d| vec![d.ne, d.ex], |b, m| m.style(GO) && !b.gate_up_interleaved),
    e(Role::ExpertUpBias, R, Bias, "mlp.experts.up_proj_bias", "ffn_up_exps.bias", |d| vec![d.ne, d.ex], |b, m| m.style(GO) && !b.gate_up_interleaved),
    e(Role::ExpertDownBias, R, Bias, "mlp.experts.down_proj_bias", "ffn_down_exps.bias", |d| vec![d.ne, d.h], |_, m| m.style(GO)),
    e(Role::RouterBias, R, Bias, "mlp.gate.e_score_correction_bias", "exp_probs_b.bias", |d| vec![d.ne], |_, m| m.bias()),
    e(Role::SharedGate, R, Matrix, "mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight", |d| vec![d.sh, d.h], |_, m| m.shared() && !m.style(DS)),
    e(Role::SharedUp, R, Matrix, "mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight", |d| vec![d.sh, d.h], |_, m| m.shared() && !m.style(DS)),
    e(Role::SharedDown, R, Matrix, "mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight", |d| vec![d.h, d.sh], |_, m| m.shared() && !m.style(DS)),
    e(Role::SharedGate, R, Matrix, "mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight", |d| vec![d.sh, d.h], |_, m| m.shared() && m.style(DS)),
    e(Role::SharedUp, R, Matrix, "mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight", |d| vec![d.sh, d.h], |_, m| m.shared() && m.style(DS)),
    e(Role::SharedDown, R, Matrix, "mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight", |d| vec![d.h, d.sh], |_, m| m.shared() && m.style(DS)),
    e(Role::SharedExpertGate, R, Bias, "mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight", |d| vec![1, d.h], |_, m| m.gated()),
    // Experts: `{e}` is the expert's index in transformers' names; GGUF stacks them.
    e(Role::ExpertGate, X, Expert, "block_sparse_moe.experts.{e}.w1.weight", "ffn_gate_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(MX)),
    e(Role::ExpertUp, X, Expert, "block_sparse_moe.experts.{e}.w3.weight", "ffn_up_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(MX)),
    e(Role::ExpertDown, X, Expert, "block_sparse_moe.experts.{e}.w2.weight", "ffn_down_exps.weight", |d| vec![d.h, d.ex], |_, m| m.style(MX)),
    e(Role::ExpertGate, X, Expert, "mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(QW)),
    e(Role::ExpertUp, X, Expert, "mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(QW)),
    e(Role::ExpertDown, X, Expert, "mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight", |d| vec![d.h, d.ex], |_, m| m.style(QW)),
    e(Role::ExpertGate, X, Expert, "mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(DS)),
    e(Role::ExpertUp, X, Expert, "mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight", |d| vec![d.ex, d.h], |_, m| m.style(DS)),
    e(Role::ExpertDown, X, Expert, "mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight", |d| vec![d.h, d.ex], |_, m| m.style(DS)),
    // GPT-OSS stacks a layer's experts in transformers' checkpoints too (no `{e}`).
    e(Role::ExpertGateUp, X, Expert, "mlp.experts.gate_up_proj", "ffn_gate_up_exps.weight", |d| vec![2 * d.ex, d.h], |b, m| m.style(GO) && b.gate_up_interleaved),
    e(Role::ExpertGate, X, Expert, "mlp.experts.gate_proj", "ffn_gate_exps.weight", |d| vec![d.ex, d.h], |b, m| m.style(GO) && !b.gate_up_interleaved),
    e(Role::ExpertUp, X, Expert, "mlp.experts.up_proj", "ffn_up_exps.weight", |d| vec![d.ex, d.h], |b, m| m.style(GO) && !b.gate_up_interleaved),
    e(Role::ExpertDown, X, Expert, "mlp.experts.down_proj", "ffn_down_exps.weight", |d| vec![d.h, d.ex], |_, m| m.style(GO)),
    e(Role::PostMlpNorm, M, Norm, "post_feedforward_layernorm.weight", "post_ffw_norm.weight", |d| vec![d.h], |b, _| b.sandwich_norms && !b.glm_norms),
    e(Role::PostMlpNorm, M, Norm, "post_mlp_layernorm.weight", "post_ffw_norm.weight", |d| vec![d.h], |b, _| b.glm_norms),
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
    /// Experts in the layer (for an expert's tensor; 0 otherwise).
    pub experts: usize,
    /// Heads a per-head matrix is stacked over in GGUF (`attn_k_b`, `attn_v_b`; 0 otherwise).
    pub heads: usize,
}

impl TensorSpec {
    /// The tensor's name in layer `layer` under `naming`. For an expert's tensor this is
    /// expert 0's in transformers' naming, and the stacked tensor's in GGUF's.
    pub fn name(&self, naming: Naming, layer: usize) -> String {
        self.expert_name(naming, layer, 0).0
    }
    /// Where expert `expert`'s matrix is: the tensor's name and its first row there (GGUF
    /// stacks a layer's experts in one tensor of `experts × rows` rows).
    pub fn expert_name(&self, naming: Naming, layer: usize, expert: usize) -> (String, usize) {
        match naming {
            Naming::Hf if self.kind == Kind::Expert && self.hf_stacked() => (
                format!("model.layers.{layer}.{}", self.hf),
                expert * self.shape[0],
            ),
            Naming::Hf => (
                format!(
                    "model.layers.{layer}.{}",
                    self.hf.replace("{e}", &expert.to_string())
                ),
                0,
            ),
            Naming::Gguf => (format!("blk.{layer}.{}", self.gguf), expert * self.shape[0]),
        }
    }
    /// Whether transformers' checkpoint stacks a layer's experts in this one tensor (GPT-OSS),
    /// rather than one tensor per expert.
    pub fn hf_stacked(&self) -> bool {
        !self.hf.contains("{e}")
    }
    /// The stored shape under `naming`: GGUF stacks experts, and keeps 1-row vectors 1-D.
    pub fn stored_shape(&self, naming: Naming) -> Vec<usize> {
        match (naming, self.kind) {
            (Naming::Hf, Kind::Expert) if self.hf_stacked() => {
                let mut s = vec![self.experts];
                s.extend(&self.shape);
                s
            }
            (Naming::Gguf, Kind::Expert) => {
                let mut s = vec![self.experts];
                s.extend(&self.shape);
                s
            }
            (Naming::Gguf, Kind::Bias | Kind::Norm) => {
                self.shape.iter().copied().filter(|&d| d != 1).collect()
            }
            (Naming::Gguf, _) if self.heads > 0 => {
                vec![self.heads, self.shape[0] / self.heads, self.shape[1]]
            }
            _ => self.shape.clone(),
        }
    }
    /// Whether the tensor is a norm or bias (small, f32 in memory).
    pub fn is_small(&self) -> bool {
        matches!(self.kind, Kind::Norm | Kind::Bias)
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
    /// Layer `layer`'s tensors (MoE models mix sparse and dense layers).
    pub fn new(cfg: &ModelConfig, layer: usize) -> Self {
        let moe = cfg.moe.as_ref();
        let mla = cfg.mla.as_ref();
        let lin = cfg.linear.as_ref();
        let d = Dims {
            h: cfg.hidden_size,
            q: cfg.num_heads * cfg.head_dim,
            kv: cfg.num_kv_heads * cfg.head_dim,
            hd: cfg.head_dim,
            im: cfg.intermediate_size,
            ne: moe.map_or(0, |m| m.experts),
            ex: moe.map_or(0, |m| m.expert_size),
            sh: moe.and_then(|m| m.shared_size).unwrap_or(0),
            o: cfg.num_heads * cfg.v_head_dim(),
            qr: mla.and_then(|m| m.q_lora_rank).unwrap_or(0),
            kr: mla.map_or(0, |m| m.kv_lora_rank),
            rope: mla.map_or(0, |m| m.qk_rope_head_dim),
            kvb: mla.map_or(0, |m| cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim)),
            nh: cfg.num_heads,
            nope: mla.map_or(0, |m| m.qk_nope_head_dim),
            vd: cfg.v_head_dim(),
            qg: cfg.num_heads * cfg.head_dim * if cfg.block.attn_gate { 2 } else { 1 },
            lk: lin.map_or(0, |l| l.key_heads * l.key_dim),
            lv: lin.map_or(0, |l| l.value_heads * l.value_dim),
            lnv: lin.map_or(0, |l| l.value_heads),
            lc: lin.map_or(0, |l| l.conv_dim()),
            lkern: lin.map_or(0, |l| l.conv_kernel),
            ldv: lin.map_or(0, |l| l.value_dim),
        };
        let mlp = match cfg.sparse_layer(layer) {
            Some(m) => LayerMlp::Sparse {
                style: m.style,
                shared: m.shared_size.is_some(),
                gated: m.shared_gated && m.shared_size.is_some(),
                bias: m.routing.correction_bias,
            },
            None => LayerMlp::Dense,
        };
        let opts = LayerOpts {
            mlp,
            linear: cfg.is_linear(layer),
            fused_linear: lin.is_some_and(|l| l.fused),
        };
        let permute = cfg.arch.permutes_qk();
        let tensors = TABLE
            .iter()
            .filter(|t| (t.when)(&cfg.block, opts))
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
                experts: if t.kind == Kind::Expert { d.ne } else { 0 },
                heads: if matches!(t.role, Role::KB | Role::VB) {
                    d.nh
                } else {
                    0
                },
            })
            .collect();
        LayerSchema { tensors }
    }

    /// Every layer's schema.
    pub fn all(cfg: &ModelConfig) -> Vec<LayerSchema> {
        (0..cfg.num_layers).map(|l| Self::new(cfg, l)).collect()
    }

    pub fn get(&self, role: Role) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.role == role)
    }

    /// The matrices read with the layer (all but the experts), in execution order.
    pub fn matrices(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.kind == Kind::Matrix)
    }

    /// One expert's matrices (gate, up, down), empty for a dense layer.
    pub fn experts(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.kind == Kind::Expert)
    }

    /// Whether routing picks experts in this layer.
    pub fn is_sparse(&self) -> bool {
        self.get(Role::Router).is_some()
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
            Naming::Hf => "model.embed_tokens.weight",
            Naming::Gguf => "token_embd.weight",
        }
    }
    pub fn final_norm(self) -> &'static str {
        match self {
            Naming::Hf => "model.norm.weight",
            Naming::Gguf => "output_norm.weight",
        }
    }
    pub fn head(self) -> &'static str {
        match self {
            Naming::Hf => "lm_head.weight",
            Naming::Gguf => "output.weight",
        }
    }
    /// llama.cpp's Llama 3.1 RoPE rescaling as per-frequency divisors. GGUF only:
    /// transformers keeps RoPE scaling in `config.json`.
    pub const GGUF_ROPE_FREQS: &'static str = "rope_freqs.weight";
    /// llama.cpp's LongRoPE (Phi-3) factor sets, GGUF only like [`Self::GGUF_ROPE_FREQS`].
    pub const GGUF_ROPE_FACTORS_LONG: &'static str = "rope_factors_long.weight";
    pub const GGUF_ROPE_FACTORS_SHORT: &'static str = "rope_factors_short.weight";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_unique_per_model() {
        let mlps = [
            LayerMlp::Dense,
            LayerMlp::Sparse {
                style: MX,
                shared: false,
                gated: false,
                bias: false,
            },
            LayerMlp::Sparse {
                style: QW,
                shared: true,
                gated: true,
                bias: false,
            },
            LayerMlp::Sparse {
                style: DS,
                shared: true,
                gated: false,
                bias: true,
            },
        ];
        for (sandwich, mlp) in [false, true].into_iter().flat_map(|s| mlps.map(|m| (s, m))) {
            let mut b = BlockSpec::plain();
            b.sandwich_norms = sandwich;
            b.qkv_bias = true;
            b.mlp_bias = true;
            b.o_bias = true;
            b.qk_norm = true;
            b.fused_qkv = sandwich;
            b.fused_gate_up = sandwich;
            // Attention, and Gated DeltaNet in both its layouts.
            for (linear, fused_linear) in [(false, false), (true, false), (true, true)] {
                let opts = LayerOpts {
                    mlp,
                    linear,
                    fused_linear,
                };
                let roles: Vec<Role> = TABLE
                    .iter()
                    .filter(|t| (t.when)(&b, opts))
                    .map(|t| t.role)
                    .collect();
                let mut dedup = roles.clone();
                dedup.sort_by_key(|r| format!("{r:?}"));
                dedup.dedup();
                assert_eq!(roles.len(), dedup.len(), "sandwich {sandwich}, {opts:?}");
                assert!(roles.contains(&Role::O), "{opts:?}: no output projection");
            }
        }
    }
}

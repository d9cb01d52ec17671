//! Tensor names. The block code asks for a tensor by its role; this table says what each
//! checkpoint format calls it.

/// The tensors of one decoder layer.
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

/// The two naming schemes tensors come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Hugging Face transformers (`model.layers.N.self_attn.q_proj.weight`).
    Hf,
    /// llama.cpp GGUF (`blk.N.attn_q.weight`).
    Gguf,
}

impl Naming {
    /// The name of a layer tensor. `sandwich` selects Gemma 3's norm names in HF checkpoints,
    /// where `post_attention_layernorm` is the attention-output norm rather than the pre-MLP norm.
    pub fn layer(self, layer: usize, role: Role, sandwich: bool) -> String {
        match self {
            Naming::Hf => hf_layer(layer, role, sandwich),
            Naming::Gguf => gguf_layer(layer, role),
        }
    }
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

/// llama.cpp names.
pub fn gguf_layer(layer: usize, role: Role) -> String {
    let s = match role {
        Role::AttnNorm => "attn_norm.weight",
        Role::Q => "attn_q.weight",
        Role::K => "attn_k.weight",
        Role::V => "attn_v.weight",
        Role::O => "attn_output.weight",
        Role::QBias => "attn_q.bias",
        Role::KBias => "attn_k.bias",
        Role::VBias => "attn_v.bias",
        Role::OBias => "attn_output.bias",
        Role::QNorm => "attn_q_norm.weight",
        Role::KNorm => "attn_k_norm.weight",
        Role::MlpNorm => "ffn_norm.weight",
        Role::PostAttnNorm => "post_attention_norm.weight",
        Role::PostMlpNorm => "post_ffw_norm.weight",
        Role::Gate => "ffn_gate.weight",
        Role::Up => "ffn_up.weight",
        Role::Down => "ffn_down.weight",
        Role::GateBias => "ffn_gate.bias",
        Role::UpBias => "ffn_up.bias",
        Role::DownBias => "ffn_down.bias",
    };
    format!("blk.{layer}.{s}")
}

/// Hugging Face transformers names.
pub fn hf_layer(layer: usize, role: Role, sandwich: bool) -> String {
    let p = format!("model.layers.{layer}");
    let s = match role {
        Role::AttnNorm => "input_layernorm.weight",
        Role::Q => "self_attn.q_proj.weight",
        Role::K => "self_attn.k_proj.weight",
        Role::V => "self_attn.v_proj.weight",
        Role::O => "self_attn.o_proj.weight",
        Role::QBias => "self_attn.q_proj.bias",
        Role::KBias => "self_attn.k_proj.bias",
        Role::VBias => "self_attn.v_proj.bias",
        Role::OBias => "self_attn.o_proj.bias",
        Role::QNorm => "self_attn.q_norm.weight",
        Role::KNorm => "self_attn.k_norm.weight",
        Role::MlpNorm if sandwich => "pre_feedforward_layernorm.weight",
        Role::MlpNorm => "post_attention_layernorm.weight",
        Role::PostAttnNorm => "post_attention_layernorm.weight",
        Role::PostMlpNorm => "post_feedforward_layernorm.weight",
        Role::Gate => "mlp.gate_proj.weight",
        Role::Up => "mlp.up_proj.weight",
        Role::Down => "mlp.down_proj.weight",
        Role::GateBias => "mlp.gate_proj.bias",
        Role::UpBias => "mlp.up_proj.bias",
        Role::DownBias => "mlp.down_proj.bias",
    };
    format!("{p}.{s}")
}

pub const HF_EMBED: &str = "model.embed_tokens.weight";
pub const HF_FINAL_NORM: &str = "model.norm.weight";
pub const HF_LM_HEAD: &str = "lm_head.weight";

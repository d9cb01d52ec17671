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
    MlpNorm,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// Hugging Face transformers names.
pub fn hf_layer(layer: usize, role: Role) -> String {
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
        Role::MlpNorm => "post_attention_layernorm.weight",
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

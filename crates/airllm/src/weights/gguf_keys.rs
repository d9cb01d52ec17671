//! The GGUF vocabulary: llama.cpp's architecture names and metadata keys, spelled once. This is
//! the one place they live; the config reader (`ModelConfig::from_gguf`) and the converter's
//! writer both go through it, so a key cannot be written under one name and read under
//! another (the same idea as llama.cpp's `llama-arch.cpp`). Tensor names live in the layer
//! schema's [`Naming`](super::schema::Naming).

use crate::config::Arch;

/// Each architecture and the name llama.cpp gives it in `general.architecture`, which is also
/// the prefix of its keys. Several architectures share `llama`: reading takes a name's first
/// row, except that a file with experts takes the row with experts (Mixtral is llama.cpp's
/// `llama` with experts; Mistral reads back as Llama, which runs it the same).
const ARCHS: &[(Arch, &str)] = &[
    (Arch::Llama, "llama"),
    (Arch::Mistral, "llama"),
    (Arch::Qwen2, "qwen2"),
    (Arch::Qwen3, "qwen3"),
    (Arch::Gemma2, "gemma2"),
    (Arch::Gemma3, "gemma3"),
    (Arch::Mixtral, "llama"),
    (Arch::Qwen2Moe, "qwen2moe"),
    (Arch::Qwen3Moe, "qwen3moe"),
    (Arch::Phi3, "phi3"),
    // DeepSeek V2 and V3 share llama.cpp's `deepseek2`; reading tells them apart by the
    // gating function (softmax for V2, sigmoid for V3).
    (Arch::DeepseekV2, "deepseek2"),
    (Arch::DeepseekV3, "deepseek2"),
    (Arch::Glm4, "glm4"),
    (Arch::Glm4Moe, "glm4moe"),
    (Arch::GptOss, "gpt-oss"),
];

/// The GGUF name an architecture is written under, `None` for those this version reads only
/// from Hugging Face folders.
pub fn arch_name(arch: Arch) -> Option<&'static str> {
    ARCHS.iter().find(|(a, _)| *a == arch).map(|(_, n)| *n)
}

/// The architecture a file of GGUF architecture `name` is read as; `has_experts` is whether
/// its metadata counts experts.
pub fn arch_of(name: &str, has_experts: bool) -> Option<Arch> {
    let mut rows = ARCHS.iter().filter(|(_, n)| *n == name);
    let first = rows.clone().next()?.0;
    Some(
        rows.find(|(a, _)| has_experts && a.has_experts())
            .map_or(first, |(a, _)| *a),
    )
}

/// The GGUF architecture names this engine reads, in table order, for error messages.
pub fn supported_archs() -> String {
    let mut names: Vec<&str> = Vec::new();
    for (_, n) in ARCHS {
        if !names.contains(n) {
            names.push(n);
        }
    }
    names.join(", ")
}

/// `general.architecture`: the architecture's GGUF name.
pub const ARCHITECTURE: &str = "general.architecture";
pub const NAME: &str = "general.name";
/// llama.cpp's `llama_ftype`.
pub const FILE_TYPE: &str = "general.file_type";
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
pub const TOKENS: &str = "tokenizer.ggml.tokens";
/// This engine's own key: the vocabulary size of a file whose token list was dropped after
/// the tokenizer was built from it.
pub const TOKEN_COUNT: &str = "tokenizer.ggml.tokens.count";
pub const BOS_TOKEN_ID: &str = "tokenizer.ggml.bos_token_id";
pub const EOS_TOKEN_ID: &str = "tokenizer.ggml.eos_token_id";

/// The per-architecture metadata keys, each `{arch}.<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    ContextLength,
    EmbeddingLength,
    BlockCount,
    FeedForwardLength,
    VocabSize,
    HeadCount,
    HeadCountKv,
    KeyLength,
    ValueLength,
    LayerNormRmsEpsilon,
    /// Explicit query scale, for models whose scale is not the architecture's default.
    AttentionScale,
    SlidingWindow,
    /// Gemma 3: which layers slide (an array of flags, or every n-th layer global).
    SlidingWindowPattern,
    RopeDimensionCount,
    RopeFreqBase,
    /// Gemma 3: the RoPE base of the sliding-window layers.
    RopeFreqBaseSwa,
    RopeScalingType,
    RopeScalingFactor,
    RopeScalingOriginalContextLength,
    RopeScalingAttnFactor,
    FinalLogitSoftcapping,
    AttnLogitSoftcapping,
    ExpertCount,
    ExpertUsedCount,
    ExpertFeedForwardLength,
    ExpertSharedFeedForwardLength,
    /// Whether the top-k routing weights are renormalized.
    ExpertWeightsNorm,
    /// DeepSeek's `routed_scaling_factor`.
    ExpertWeightsScale,
    /// 1 softmax, 2 sigmoid (llama.cpp's `llama_expert_gating_func_type`).
    ExpertGatingFunc,
    ExpertSharedCount,
    /// Group-limited routing: `n_group` and `topk_group`.
    ExpertGroupCount,
    ExpertGroupUsedCount,
    /// Layers before the first sparse one (`first_k_dense_replace`).
    LeadingDenseBlockCount,
    /// Latent attention ranks; absent `q_lora_rank` means queries through `attn_q`.
    QLoraRank,
    KvLoraRank,
    /// The per-head query/key and value widths of latent attention. llama.cpp's
    /// `key_length`/`value_length` then describe the latent (`rank + rope`, `rank`); files
    /// without these keys are the older kind with one `attn_kv_b`.
    KeyLengthMla,
    ValueLengthMla,
    /// `0.1 · mscale_all_dim`, as llama.cpp's converter writes it for DeepSeek.
    RopeScalingYarnLogMul,
    RopeScalingYarnBetaFast,
    RopeScalingYarnBetaSlow,
    /// Multi-token-prediction layers counted in `block_count` after the trunk (GLM-4.5).
    NextnPredictLayers,
}

impl Key {
    fn suffix(self) -> &'static str {
        match self {
            Key::ContextLength => "context_length",
            Key::EmbeddingLength => "embedding_length",
            Key::BlockCount => "block_count",
            Key::FeedForwardLength => "feed_forward_length",
            Key::VocabSize => "vocab_size",
            Key::HeadCount => "attention.head_count",
            Key::HeadCountKv => "attention.head_count_kv",
            Key::KeyLength => "attention.key_length",
            Key::ValueLength => "attention.value_length",
            Key::LayerNormRmsEpsilon => "attention.layer_norm_rms_epsilon",
            Key::AttentionScale => "attention.scale",
            Key::SlidingWindow => "attention.sliding_window",
            Key::SlidingWindowPattern => "attention.sliding_window_pattern",
            Key::RopeDimensionCount => "rope.dimension_count",
            Key::RopeFreqBase => "rope.freq_base",
            Key::RopeFreqBaseSwa => "rope.freq_base_swa",
            Key::RopeScalingType => "rope.scaling.type",
            Key::RopeScalingFactor => "rope.scaling.factor",
            Key::RopeScalingOriginalContextLength => "rope.scaling.original_context_length",
            Key::RopeScalingAttnFactor => "rope.scaling.attn_factor",
            Key::FinalLogitSoftcapping => "final_logit_softcapping",
            Key::AttnLogitSoftcapping => "attn_logit_softcapping",
            Key::ExpertCount => "expert_count",
            Key::ExpertUsedCount => "expert_used_count",
            Key::ExpertFeedForwardLength => "expert_feed_forward_length",
            Key::ExpertSharedFeedForwardLength => "expert_shared_feed_forward_length",
            Key::ExpertWeightsNorm => "expert_weights_norm",
            Key::ExpertWeightsScale => "expert_weights_scale",
            Key::ExpertGatingFunc => "expert_gating_func",
            Key::ExpertSharedCount => "expert_shared_count",
            Key::ExpertGroupCount => "expert_group_count",
            Key::ExpertGroupUsedCount => "expert_group_used_count",
            Key::LeadingDenseBlockCount => "leading_dense_block_count",
            Key::QLoraRank => "attention.q_lora_rank",
            Key::KvLoraRank => "attention.kv_lora_rank",
            Key::KeyLengthMla => "attention.key_length_mla",
            Key::ValueLengthMla => "attention.value_length_mla",
            Key::RopeScalingYarnLogMul => "rope.scaling.yarn_log_multiplier",
            Key::RopeScalingYarnBetaFast => "rope.scaling.yarn_beta_fast",
            Key::RopeScalingYarnBetaSlow => "rope.scaling.yarn_beta_slow",
            Key::NextnPredictLayers => "nextn_predict_layers",
        }
    }

    /// The full key for architecture `arch` (its GGUF name), e.g. `llama.block_count`.
    pub fn of(self, arch: &str) -> String {
        format!("{arch}.{}", self.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &(arch, name) in ARCHS {
            let back = arch_of(name, arch.has_experts()).unwrap();
            // Mistral is written as llama and read back as Llama; DeepSeek V3 is told from
            // V2 by its metadata, not its name.
            let expect = match arch {
                Arch::Mistral => Arch::Llama,
                Arch::DeepseekV3 => Arch::DeepseekV2,
                a => a,
            };
            assert_eq!(back, expect, "{name}");
            assert_eq!(arch_name(arch), Some(name));
        }
        assert_eq!(arch_of("qwen2moe", false), Some(Arch::Qwen2Moe));
        assert_eq!(arch_of("gpt2", false), None);
        assert_eq!(
            supported_archs(),
            "llama, qwen2, qwen3, gemma2, gemma3, qwen2moe, qwen3moe, phi3, deepseek2, glm4, glm4moe, gpt-oss"
        );
        assert_eq!(Key::BlockCount.of("qwen3"), "qwen3.block_count");
    }
}

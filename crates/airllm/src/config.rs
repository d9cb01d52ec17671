//! The model configuration, read from a Hugging Face `config.json` of either generation:
//! transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) or transformers 5
//! (`rope_parameters`, `dtype`). Architectures differ only in the options of [`BlockSpec`];
//! there is one decoder block for all of them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Phi3,
    /// DeepSeek V2 and V2-Lite: multi-head latent attention, softmax routing.
    DeepseekV2,
    /// DeepSeek V3/R1 and Kimi K2: latent attention, sigmoid routing with a correction bias.
    DeepseekV3,
    /// GLM-4 (0414) dense: post-attention and post-MLP norms, fused gate-up, partial rotary.
    Glm4,
    /// GLM-4.5 and GLM-4.5-Air: DeepSeek-V3's routing on a GQA block with partial rotary.
    Glm4Moe,
    /// GPT-OSS 20B and 120B: attention sinks, alternating sliding windows, MXFP4 experts with
    /// biases and a clamped SwiGLU, softmax over the top-k router logits.
    GptOss,
    /// Qwen3-Next: three Gated DeltaNet layers to one gated full-attention layer, experts with
    /// a gated shared expert; q/k/v/z and b/a come fused and grouped by key head.
    Qwen3Next,
    /// Qwen3.5's mixtures: Qwen3-Next's layers with separate q/k/v, z, b and a projections.
    Qwen35Moe,
    /// The dense Qwen3.5: the same hybrid layers with a dense MLP.
    Qwen35,
}

impl Arch {
    /// Every architecture, in the order error messages list them.
    pub const ALL: [Arch; 18] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Mixtral,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Phi3,
        Arch::DeepseekV2,
        Arch::DeepseekV3,
        Arch::Glm4,
        Arch::Glm4Moe,
        Arch::GptOss,
        Arch::Qwen3Next,
        Arch::Qwen35Moe,
        Arch::Qwen35,
    ];
    /// The architecture `config.json` names, by its `architectures` entry or its
    /// `model_type`: read through the same names it is written with.
    pub fn from_hf(name: &str) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.hf_name() == name || a.model_type() == name)
    }
    /// The `architectures` names this engine runs, for error messages.
    pub fn supported_hf() -> String {
        Arch::ALL.map(Arch::hf_name).join(", ")
    }
    /// The name in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::DeepseekV2 => "DeepseekV2ForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
            Arch::Glm4 => "Glm4ForCausalLM",
            Arch::Glm4Moe => "Glm4MoeForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
            Arch::Qwen3Next => "Qwen3NextForCausalLM",
            Arch::Qwen35Moe => "Qwen3_5MoeForCausalLM",
            Arch::Qwen35 => "Qwen3_5ForCausalLM",
        }
    }
    /// Gemma's family traits: norms stored as w and applied as 1 + w (llama.cpp stores 1 + w),
    /// embeddings scaled by √hidden, GELU, a tied head by default.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3_text",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Phi3 => "phi3",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4 => "glm4",
            Arch::Glm4Moe => "glm4_moe",
            Arch::GptOss => "gpt_oss",
            Arch::Qwen3Next => "qwen3_next",
            Arch::Qwen35Moe => "qwen3_5_moe_text",
            Arch::Qwen35 => "qwen3_5_text",
        }
    }
    /// transformers' Llama layout of q/k rows, which llama.cpp's converter permutes.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral | Arch::Mixtral)
    }
    /// Whether the architecture routes tokens to experts.
    pub fn has_experts(self) -> bool {
        matches!(
            self,
            Arch::Mixtral
                | Arch::Qwen2Moe
                | Arch::Qwen3Moe
                | Arch::DeepseekV2
                | Arch::DeepseekV3
                | Arch::Glm4Moe
                | Arch::GptOss
                | Arch::Qwen3Next
                | Arch::Qwen35Moe
        )
    }
    /// Whether most layers are Gated DeltaNet linear attention ([`LinearSpec`]).
    pub fn is_hybrid(self) -> bool {
        matches!(self, Arch::Qwen3Next | Arch::Qwen35Moe | Arch::Qwen35)
    }
    /// The multimodal wrapper whose `text_config` holds this text model's config (Qwen3.5's
    /// releases), so that its language model runs on its own: its architecture name and its
    /// `model_type`, for a config that names only the latter.
    fn wrapper_names(self) -> Option<[&'static str; 2]> {
        match self {
            Arch::Qwen35Moe => Some(["Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe"]),
            Arch::Qwen35 => Some(["Qwen3_5ForConditionalGeneration", "qwen3_5"]),
            _ => None,
        }
    }
    /// Whether attention is DeepSeek's multi-head latent attention.
    pub fn is_mla(self) -> bool {
        matches!(self, Arch::DeepseekV2 | Arch::DeepseekV3)
    }
}

/// How a mixture-of-experts layer's tensors are named in transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeStyle {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.w1/w2/w3`.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.N.gate_proj/up_proj/down_proj` (Qwen2-MoE, Qwen3-MoE).
    Qwen,
    /// Qwen's expert names, with `mlp.shared_experts` (no gate) and the router's
    /// `e_score_correction_bias` (DeepSeek V2/V3, GLM-4.5).
    Deepseek,
    /// `mlp.router` with a bias, and a layer's experts stacked in `mlp.experts.gate_up_proj`
    /// (gate and up rows interleaved) and `mlp.experts.down_proj`, with biases (GPT-OSS).
    GptOss,
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    /// Each expert's score is its own sigmoid (DeepSeek V3, GLM-4.5).
    Sigmoid,
    /// The top-k logits are chosen, and their softmax is the weights (GPT-OSS).
    TopKSoftmax,
}

/// GPT-OSS's clamped SwiGLU: the gate is clamped above at `limit` and the up projection to
/// ±`limit`, and the output is `(up + 1) · gate · σ(alpha · gate)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampedSwiglu {
    pub alpha: f32,
    pub limit: f32,
}

/// Group-limited routing: the experts are split into `groups` equal groups, and a token
/// chooses only among the experts of its best `top_groups` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroups {
    pub groups: usize,
    pub top_groups: usize,
    /// A group's score is the sum of its two best choice scores (DeepSeek V3's `noaux_tc`),
    /// else its best score (V2's `group_limited_greedy`).
    pub top2_sum: bool,
}

/// How a sparse layer picks its experts and weighs them.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub scoring: Scoring,
    /// `e_score_correction_bias` is added to the scores for the choice only; the weights come
    /// from the scores without it.
    pub correction_bias: bool,
    pub groups: Option<ExpertGroups>,
    /// The chosen weights are multiplied by this (`routed_scaling_factor`), after any
    /// renormalization.
    pub scale: f32,
}

impl Routing {
    /// Softmax over every expert, no groups, no scaling (Mixtral, Qwen).
    pub fn softmax() -> Self {
        Routing {
            scoring: Scoring::Softmax,
            correction_bias: false,
            groups: None,
            scale: 1.0,
        }
    }
}

/// DeepSeek's multi-head latent attention. Queries come from `q_proj`, or through the
/// `q_lora_rank` bottleneck; keys and values from one latent of `kv_lora_rank` values per
/// token, expanded per head by `kv_b_proj`, plus a `qk_rope_head_dim` RoPE key shared by all
/// heads. The cache holds only the latent and that key.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaSpec {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Epsilon of the bottleneck norms: 1e-6 in DeepSeek's code and transformers whatever
    /// `rms_norm_eps` says; llama.cpp (and so a GGUF file) uses `rms_norm_eps`.
    pub norm_eps: f64,
}

impl MlaSpec {
    /// Values one token keeps per layer: the latent and the RoPE key.
    pub fn cache_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5: in place of a KV cache each
/// sequence keeps, per layer, a `key_dim × value_dim` state for each value head and the last
/// `conv_kernel - 1` inputs of the short causal convolution over q, k and v.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_kernel: usize,
    /// q, k, v and z come from one projection and b and a from another, both grouped by key
    /// head (Qwen3-Next's `in_proj_qkvz`, `in_proj_ba`), rather than from four (Qwen3.5).
    pub fused: bool,
    /// Which layers are linear; the others are full attention.
    pub layers: Vec<bool>,
}

impl LinearSpec {
    /// Channels of the convolution: q, k and v side by side.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
    }
    /// f32 values one sequence's state holds in one linear layer: the recurrent state and the
    /// convolution's window.
    pub fn state_values(&self) -> usize {
        self.value_heads * self.key_dim * self.value_dim + self.conv_dim() * (self.conv_kernel - 1)
    }
}

/// The mixture-of-experts options: each sparse layer routes every token to `top_k` of
/// `experts` gated MLPs of width `expert_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub style: MoeStyle,
    pub experts: usize,
    pub top_k: usize,
    pub expert_size: usize,
    /// The top-k routing weights are renormalized to sum to 1 (Mixtral, Qwen3-MoE).
    pub norm_topk: bool,
    /// Width of the always-on shared expert (DeepSeek's `n_shared_experts` of them as one).
    pub shared_size: Option<usize>,
    /// The shared expert's output is scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_gated: bool,
    pub routing: Routing,
    /// Which layers are sparse; the others have the dense MLP of `intermediate_size`.
    pub sparse: Vec<bool>,
    /// The experts' gate is GPT-OSS's clamped SwiGLU (and their projections have biases).
    pub clamped: Option<ClampedSwiglu>,
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f32,
    },
    /// YaRN: frequencies interpolated by `factor` below the band that `beta_fast`/`beta_slow`
    /// rotations bound, kept above it, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f32,
        /// Round the band's edges to whole dimensions (transformers' default).
        truncate: bool,
        /// DeepSeek's `mscale_all_dim`, which also scales its softmax (kept to write it back).
        mscale_all_dim: Option<f64>,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3): each frequency divided by its own factor, the long set when the
    /// context passes the original one, and cos/sin scaled by `attention_factor`. A GGUF file
    /// keeps the factors as tensors; its config has them empty until the model is opened.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// Per-architecture options of the one generic decoder block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    /// Bias on the q, k and v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every norm weight at load: Gemma's RMSNorm scales by (1 + w). llama.cpp's
    /// converter already adds it, so GGUF files use 0.
    pub norm_offset: f32,
    /// Norms after attention and after the MLP as well as before (Gemma 3's "sandwich").
    pub sandwich_norms: bool,
    pub act: Activation,
    /// RoPE rotates adjacent pairs (llama.cpp's layout for Llama GGUF files, whose q/k rows the
    /// converter permuted) instead of the two halves (transformers' layout).
    pub rope_interleaved: bool,
    /// q, k and v in one `qkv_proj` matrix (Phi-3).
    pub fused_qkv: bool,
    /// gate and up in one `gate_up_proj` matrix, gate rows first (Phi-3).
    pub fused_gate_up: bool,
    /// DeepSeek's latent attention in place of q/k/v ([`MlaSpec`]), and whether its queries
    /// go through the `q_lora_rank` bottleneck.
    pub mla: bool,
    pub q_lora: bool,
    /// Latent attention's `kv_b_proj` comes split per head into `attn_k_b` and `attn_v_b`
    /// (llama.cpp's current GGUF form) rather than whole.
    pub kv_b_split: bool,
    /// GLM-4's names for the sandwich norms (`post_self_attn_layernorm`,
    /// `post_mlp_layernorm`) instead of Gemma's.
    pub glm_norms: bool,
    /// llama.cpp names GLM-4.5's pre-MLP norm `post_attention_norm`, not `ffn_norm`.
    pub mlp_norm_post_attention: bool,
    /// A learned logit per head joins each softmax's denominator (GPT-OSS's sinks).
    pub sinks: bool,
    /// A layer's experts come stacked with gate and up rows interleaved in one matrix
    /// (transformers' GPT-OSS checkpoints), rather than as separate gate and up stacks
    /// (llama.cpp's form).
    pub gate_up_interleaved: bool,
    /// `q_proj` also gives a gate per head (each head's query rows, then its gate rows), and
    /// the attention output is scaled by its sigmoid (Qwen3-Next).
    pub attn_gate: bool,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU as llama.cpp computes it on CPU: inputs in (-10, 10) rounded to f16 and looked up
    /// in an f16 table. Used for GGUF files so they compute llama.cpp's function; it moves
    /// logits by up to ~5e-3 from the exact GELU.
    GeluTanhF16,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (the first ones; Phi-3's partial rotary).
    pub rotary_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Window size for each layer, `None` for full attention.
    pub layer_windows: Vec<Option<usize>>,
    pub block: BlockSpec,
    /// The dtype the checkpoint declares (`dtype` or `torch_dtype`), informational.
    pub declared_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Multiplier of q·k: 1/sqrt(head_dim), or Gemma's 1/sqrt(query_pre_attn_scalar).
    pub attn_scale: f64,
    /// Multiplier of the token embeddings (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f64>,
    /// RoPE for sliding-window layers when it differs from `rope` (Gemma 3's local base).
    pub rope_local: Option<RopeConfig>,
    /// Final logits become cap·tanh(logits/cap).
    pub final_logit_softcap: Option<f64>,
    /// Attention scores become cap·tanh(scores/cap) before the mask (Gemma 2).
    pub attn_logit_softcap: Option<f64>,
    /// Mixture-of-experts options, for sparse models.
    pub moe: Option<MoeSpec>,
    /// Latent attention (DeepSeek). `head_dim` is then the query/key head (nope + rope), and
    /// `rotary_dim` the RoPE part.
    pub mla: Option<MlaSpec>,
    /// FP8 block scales the checkpoint declares (`quantization_config`), informational: each
    /// matrix's own scale tensor is what is read.
    pub fp8: Option<Fp8Spec>,
    /// Gated DeltaNet layers (Qwen3-Next, Qwen3.5).
    pub linear: Option<LinearSpec>,
}

/// `quantization_config` of an FP8 checkpoint with block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Spec {
    /// `e4m3` or `e5m2`.
    pub fmt: String,
    /// Rows and columns of one scale block.
    pub block: [usize; 2],
}

impl ModelConfig {
    /// The MoE options when layer `layer` is sparse.
    pub fn sparse_layer(&self, layer: usize) -> Option<&MoeSpec> {
        self.moe.as_ref().filter(|m| m.sparse[layer])
    }

    /// The RoPE a layer uses: 0 for `rope`, 1 for `rope_local`.
    pub fn layer_rope(&self, layer: usize) -> usize {
        usize::from(self.rope_local.is_some() && self.layer_windows[layer].is_some())
    }

    /// Whether layer `layer` is Gated DeltaNet (a recurrent state, no KV cache).
    pub fn is_linear(&self, layer: usize) -> bool {
        self.linear.as_ref().is_some_and(|l| l.layers[layer])
    }

    /// Values one token keeps in one layer's cache: keys and values, or MLA's latent.
    pub fn kv_values_per_token(&self) -> usize {
        match &self.mla {
            Some(m) => m.cache_dim(),
            None => 2 * self.num_kv_heads * self.head_dim,
        }
    }

    /// Width of one head's attention output (MLA's `v_head_dim`, else `head_dim`).
    pub fn v_head_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |m| m.v_head_dim)
    }
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

struct Reader<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Reader<'_> {
    /// A required count of at least one.
    fn positive(&self, key: &str) -> Result<usize> {
        match self.usize_req(key)? {
            0 => Err(Error::config(self.path, key, "must be at least 1")),
            n => Ok(n),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        match get(self.v, key) {
            None => Err(Error::config(self.path, key, "required field is missing")),
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::config(
                    self.path,
                    key,
                    format!("expected a non-negative integer, got {x}"),
                )
            }),
        }
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match get(self.v, key) {
            None => Ok(None),
            Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                Error::config(
                    self.path,
                    key,
                    format!("expected a non-negative integer, got {x}"),
                )
            }),
        }
    }
    fn f64_opt(&self, obj: &Value, key: &str) -> Result<Option<f64>> {
        match get(obj, key) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                Error::config(self.path, key, format!("expected a number, got {x}"))
            }),
        }
    }
    /// `num_experts_per_tok`, between 1 and `experts`.
    fn top_k(&self, experts: usize) -> Result<usize> {
        let top_k = self.usize_req("num_experts_per_tok")?;
        if top_k == 0 || top_k > experts {
            return Err(Error::config(
                self.path,
                "num_experts_per_tok",
                format!("{top_k} must be between 1 and the {experts} experts"),
            ));
        }
        Ok(top_k)
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match get(self.v, key) {
            None => Ok(None),
            Some(x) => x.as_bool().map(Some).ok_or_else(|| {
                Error::config(self.path, key, format!("expected true or false, got {x}"))
            }),
        }
    }
}

/// Reads token ids given as an integer or a list of integers.
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        Self::from_value(path, &v)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::file(path, "expected a JSON object"));
        }
        let r = Reader { path, v };
        let arch_name = match get(v, "architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
        {
            Some(a) => a.to_string(),
            None => match get(v, "model_type").and_then(|m| m.as_str()) {
                Some(m) => m.to_string(),
                None => {
                    return Err(Error::config(
                        path,
                        "architectures",
                        "required field is missing",
                    ))
                }
            },
        };
        if let Some(text) = Arch::ALL.into_iter().find(|a| {
            a.wrapper_names()
                .is_some_and(|w| w.contains(&arch_name.as_str()))
        }) {
            // A multimodal release: its language model's config is `text_config`, with the
            // token ids and the head's tying at the top level when they are not inside it.
            let mut t = get(v, "text_config")
                .filter(|t| t.is_object())
                .cloned()
                .ok_or_else(|| {
                    Error::config(path, "text_config", "required by a multimodal config")
                })?;
            for key in ["bos_token_id", "eos_token_id", "tie_word_embeddings"] {
                if let (None, Some(x)) = (get(&t, key), get(v, key)) {
                    t[key] = x.clone();
                }
            }
            t["architectures"] = serde_json::json!([text.hf_name()]);
            return Self::from_value(path, &t);
        }
        let arch = Arch::from_hf(&arch_name).ok_or_else(|| Error::UnknownArch {
            path: path.to_path_buf(),
            arch: arch_name.clone(),
            supported: Arch::supported_hf(),
        })?;

        let positive = |key: &str| r.positive(key);
        let hidden_size = positive("hidden_size")?;
        let intermediate_size = positive("intermediate_size")?;
        let num_layers = positive("num_hidden_layers")?;
        let num_heads = positive("num_attention_heads")?;
        let vocab_size = positive("vocab_size")?;
        let num_kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let mla = read_mla(&r, arch)?;
        let head_dim = match r.usize_opt("head_dim")? {
            _ if mla.is_some() => mla
                .as_ref()
                .map_or(0, |m| m.qk_nope_head_dim + m.qk_rope_head_dim),
            Some(d) if d == 0 || d % 2 == 1 => {
                return Err(Error::config(
                    path,
                    "head_dim",
                    format!("{d} must be even and positive (RoPE rotates pairs)"),
                ))
            }
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::config(
                        path,
                        "head_dim",
                        "missing, and hidden_size is not a multiple of num_attention_heads",
                    ));
                }
                hidden_size / num_heads
            }
        };
        let rms_norm_eps = r.f64_opt(v, "rms_norm_eps")?.unwrap_or(1e-6);
        let max_position_embeddings = r.usize_opt("max_position_embeddings")?.unwrap_or(4096);
        let (rope, rope_local) = if arch == Arch::Gemma3 {
            read_gemma3_rope(&r)?
        } else {
            (read_rope(&r, None)?, None)
        };

        // Sliding windows: an explicit `layer_types` list wins; otherwise Mistral slides on every
        // layer and Qwen2/3 on the layers from `max_window_layers` when `use_sliding_window` is set.
        // Qwen2-MoE writes 0 when sliding is off; a 0 that a layer would use is refused below.
        let sliding_window = r.usize_opt("sliding_window")?;
        let mut linear_layers = vec![false; num_layers];
        let layer_windows = if let Some(types) = get(v, "layer_types") {
            let arr = types
                .as_array()
                .ok_or_else(|| Error::config(path, "layer_types", "expected a list"))?;
            if arr.len() != num_layers {
                return Err(Error::config(
                    path,
                    "layer_types",
                    format!("has {} entries for {num_layers} layers", arr.len()),
                ));
            }
            arr.iter()
                .zip(linear_layers.iter_mut())
                .map(|(t, linear)| match t.as_str() {
                    Some("full_attention") => Ok(None),
                    Some("linear_attention") if arch.is_hybrid() => {
                        *linear = true;
                        Ok(None)
                    }
                    Some("linear_attention") => Err(Error::config(
                        path,
                        "layer_types",
                        format!("linear_attention layers are not part of {}", arch.hf_name()),
                    )),
                    Some("sliding_attention") => sliding_window.map(Some).ok_or_else(|| {
                        Error::config(
                            path,
                            "sliding_window",
                            "required by a sliding_attention layer",
                        )
                    }),
                    _ => Err(Error::config(
                        path,
                        "layer_types",
                        format!("unknown layer type {t}"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            match arch {
                Arch::Mistral | Arch::Mixtral | Arch::Phi3 => vec![sliding_window; num_layers],
                Arch::Gemma3 => {
                    // Older Gemma 3 configs give a pattern: every n-th layer is global.
                    let n = r.usize_opt("sliding_window_pattern")?.unwrap_or(6).max(1);
                    (0..num_layers)
                        .map(|i| {
                            if (i + 1) % n == 0 {
                                None
                            } else {
                                sliding_window
                            }
                        })
                        .collect()
                }
                // Gemma 2 alternates, starting with a sliding layer.
                Arch::Gemma2 => (0..num_layers)
                    .map(|i| if i % 2 == 0 { sliding_window } else { None })
                    .collect(),
                Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe
                    if r.bool_opt("use_sliding_window")?.unwrap_or(false) =>
                {
                    // transformers' default for max_window_layers is 28.
                    let from = r.usize_opt("max_window_layers")?.unwrap_or(28);
                    (0..num_layers)
                        .map(|i| if i >= from { sliding_window } else { None })
                        .collect()
                }
                _ if arch.is_hybrid() => {
                    // Qwen3-Next's older configs: every n-th layer is full attention.
                    let n = r.usize_opt("full_attention_interval")?.unwrap_or(4).max(1);
                    for (i, l) in linear_layers.iter_mut().enumerate() {
                        *l = (i + 1) % n != 0;
                    }
                    vec![None; num_layers]
                }
                _ => vec![None; num_layers],
            }
        };
        let linear = read_linear(&r, arch, linear_layers)?;

        if layer_windows.contains(&Some(0)) {
            return Err(Error::config(
                path,
                "sliding_window",
                "must be at least 1 (or null for none)",
            ));
        }
        let attention_bias = r.bool_opt("attention_bias")?.unwrap_or(false);
        let mlp_bias = r.bool_opt("mlp_bias")?.unwrap_or(false);
        let mut block = BlockSpec::plain();
        match arch {
            Arch::Llama | Arch::Mistral => {
                block.qkv_bias = attention_bias;
                block.o_bias = attention_bias;
                block.mlp_bias = mlp_bias;
            }
            Arch::Mixtral => {}
            Arch::Phi3 => {
                block.fused_qkv = true;
                block.fused_gate_up = true;
            }
            // Qwen2-MoE's `qkv_bias` defaults to true, like Qwen2's fixed biases.
            Arch::Qwen2 => block.qkv_bias = true,
            Arch::Qwen2Moe => block.qkv_bias = r.bool_opt("qkv_bias")?.unwrap_or(true),
            Arch::Qwen3 | Arch::Qwen3Moe => {
                block.qkv_bias = attention_bias;
                block.o_bias = attention_bias;
                block.qk_norm = true;
            }
            Arch::Gemma2 | Arch::Gemma3 => {
                block.qkv_bias = attention_bias;
                block.o_bias = attention_bias;
                block.qk_norm = arch == Arch::Gemma3;
                block.norm_offset = 1.0;
                block.sandwich_norms = true;
            }
            // DeepSeek's RoPE key and query parts rotate adjacent pairs (transformers permutes
            // them into halves first, which leaves q·k as it is).
            Arch::DeepseekV2 | Arch::DeepseekV3 => {
                block.rope_interleaved = r.bool_opt("rope_interleave")?.unwrap_or(true)
            }
            // GLM-4 rotates adjacent pairs of the first half of each head; its o_proj has no
            // bias whatever `attention_bias` says.
            Arch::Glm4 => {
                block.qkv_bias = attention_bias;
                block.fused_gate_up = true;
                block.sandwich_norms = true;
                block.glm_norms = true;
                block.rope_interleaved = true;
            }
            Arch::Glm4Moe => {
                block.qkv_bias = attention_bias;
                block.qk_norm = r.bool_opt("use_qk_norm")?.unwrap_or(false);
                block.mlp_norm_post_attention = true;
            }
            // Their RMSNorms scale by (1 + w), like Gemma's; the gated norm of the linear
            // layers does not (it is read as a plain f32 vector).
            Arch::Qwen3Next | Arch::Qwen35Moe | Arch::Qwen35 => {
                block.qkv_bias = attention_bias;
                block.o_bias = attention_bias;
                block.qk_norm = true;
                block.norm_offset = 1.0;
                block.attn_gate = true;
            }
            Arch::GptOss => {
                block.qkv_bias = attention_bias;
                block.o_bias = attention_bias;
                block.sinks = true;
                block.gate_up_interleaved = true;
                block.mlp_norm_post_attention = true;
            }
        }
        if let Some(m) = &mla {
            block.mla = true;
            block.q_lora = m.q_lora_rank.is_some();
        }
        let gemma = arch.is_gemma();
        let act_key = if get(v, "hidden_activation").is_some() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        block.act = match get(v, act_key).and_then(|a| a.as_str()) {
            None => {
                if gemma {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                }
            }
            Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(Error::config(
                    path,
                    act_key,
                    format!("`{other}` is not supported (supported: silu, gelu_pytorch_tanh)"),
                ))
            }
        };
        let mut attn_scale = match (arch, r.f64_opt(v, "query_pre_attn_scalar")?) {
            (Arch::Gemma2 | Arch::Gemma3, Some(s)) if s > 0.0 => 1.0 / s.sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        if mla.is_some() {
            attn_scale *= yarn_softmax_mscale(&r)?;
        }
        let softcap = |key: &str| -> Result<Option<f64>> {
            match r.f64_opt(v, key)? {
                Some(c) if c < 0.0 || !c.is_finite() => Err(Error::config(
                    path,
                    key,
                    format!("{c} must be a positive number (or null for none)"),
                )),
                c => Ok(c.filter(|&c| c > 0.0)),
            }
        };

        let moe = read_moe(&r, arch, num_layers)?;
        let rotary_dim = match &mla {
            Some(m) => m.qk_rope_head_dim,
            // transformers defaults Qwen3-Next's and Qwen3.5's factor to 1/4.
            None => read_rotary_dim(&r, head_dim, if arch.is_hybrid() { 0.25 } else { 1.0 })?,
        };
        let fp8 = read_fp8(&r)?;
        let declared_dtype = get(v, "dtype")
            .or_else(|| get(v, "torch_dtype"))
            .and_then(|d| d.as_str())
            .map(str::to_string);
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
            max_position_embeddings,
            // Gemma ties its head to the embedding unless told otherwise.
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(gemma),
            layer_windows,
            block,
            declared_dtype,
            bos_token_id: token_ids(get(v, "bos_token_id")).first().copied(),
            eos_token_ids: token_ids(get(v, "eos_token_id")),
            attn_scale,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            rope_local,
            final_logit_softcap: softcap("final_logit_softcapping")?,
            attn_logit_softcap: softcap("attn_logit_softcapping")?,
            moe,
            rotary_dim,
            mla,
            fp8,
            linear,
        })
    }
}

/// Gated DeltaNet's sizes, for a hybrid architecture: each must be positive, and the value
/// heads a multiple of the key heads (each key head serves a run of value heads).
fn read_linear(r: &Reader, arch: Arch, layers: Vec<bool>) -> Result<Option<LinearSpec>> {
    if !arch.is_hybrid() {
        return Ok(None);
    }
    let positive = |key: &str| r.positive(key);
    let spec = LinearSpec {
        key_heads: positive("linear_num_key_heads")?,
        value_heads: positive("linear_num_value_heads")?,
        key_dim: positive("linear_key_head_dim")?,
        value_dim: positive("linear_value_head_dim")?,
        conv_kernel: positive("linear_conv_kernel_dim")?,
        fused: arch == Arch::Qwen3Next,
        layers,
    };
    if !spec.value_heads.is_multiple_of(spec.key_heads) {
        return Err(Error::config(
            r.path,
            "linear_num_value_heads",
            format!(
                "{} is not a multiple of linear_num_key_heads {}",
                spec.value_heads, spec.key_heads
            ),
        ));
    }
    Ok(Some(spec))
}

/// DeepSeek's latent attention options, checked against each other.
fn read_mla(r: &Reader, arch: Arch) -> Result<Option<MlaSpec>> {
    if !arch.is_mla() {
        return Ok(None);
    }
    let positive = |key: &str| r.positive(key);
    let m = MlaSpec {
        q_lora_rank: r.usize_opt("q_lora_rank")?.filter(|&n| n > 0),
        kv_lora_rank: positive("kv_lora_rank")?,
        qk_nope_head_dim: positive("qk_nope_head_dim")?,
        qk_rope_head_dim: positive("qk_rope_head_dim")?,
        v_head_dim: positive("v_head_dim")?,
        norm_eps: 1e-6,
    };
    if m.qk_rope_head_dim % 2 == 1 {
        return Err(Error::config(
            r.path,
            "qk_rope_head_dim",
            format!("{} must be even (RoPE rotates pairs)", m.qk_rope_head_dim),
        ));
    }
    Ok(Some(m))
}

/// DeepSeek's softmax scale correction under YaRN: `mscale(factor, mscale_all_dim)²`, which
/// its attention multiplies into 1/√head_dim (1 without YaRN or `mscale_all_dim`).
fn yarn_softmax_mscale(r: &Reader) -> Result<f64> {
    let Some(p) = get(r.v, "rope_scaling").or_else(|| get(r.v, "rope_parameters")) else {
        return Ok(1.0);
    };
    let kind = get(p, "rope_type")
        .or_else(|| get(p, "type"))
        .and_then(|t| t.as_str());
    if kind != Some("yarn") {
        return Ok(1.0);
    }
    let factor = r.f64_opt(p, "factor")?.unwrap_or(1.0);
    Ok(match r.f64_opt(p, "mscale_all_dim")? {
        Some(all) if all != 0.0 => {
            let m = yarn_mscale(factor, all);
            m * m
        }
        _ => 1.0,
    })
}

/// YaRN's magnitude correction, `0.1 · mscale · ln(factor) + 1` for factors above 1.
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// The FP8 `quantization_config`: only block-scaled e4m3/e5m2 weights are read; anything
/// else is refused by name rather than computed wrongly.
fn read_fp8(r: &Reader) -> Result<Option<Fp8Spec>> {
    let Some(q) = get(r.v, "quantization_config") else {
        return Ok(None);
    };
    let method = get(q, "quant_method")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    // MXFP4 (GPT-OSS's experts) is read from each tensor's own blocks and scales.
    if method == "mxfp4" {
        return Ok(None);
    }
    if method != "fp8" {
        return Err(Error::config(
            r.path,
            "quantization_config.quant_method",
            format!("`{method}` is not supported (supported: fp8 with block scales, mxfp4)"),
        ));
    }
    let fmt = get(q, "fmt").and_then(|f| f.as_str()).unwrap_or("e4m3");
    if fmt != "e4m3" && fmt != "e5m2" {
        return Err(Error::config(
            r.path,
            "quantization_config.fmt",
            format!("`{fmt}` is not supported (supported: e4m3, e5m2)"),
        ));
    }
    if let Some(a) = get(q, "activation_scheme").and_then(|a| a.as_str()) {
        if a != "dynamic" {
            return Err(Error::config(
                r.path,
                "quantization_config.activation_scheme",
                format!(
                    "`{a}` is not supported: activations are computed in f32 (supported: dynamic)"
                ),
            ));
        }
    }
    let block = match get(q, "weight_block_size") {
        Some(b) => {
            let v: Option<Vec<usize>> = b
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect());
            match v.as_deref() {
                Some([br, bc]) if *br > 0 && *bc > 0 => [*br, *bc],
                _ => {
                    return Err(Error::config(
                        r.path,
                        "quantization_config.weight_block_size",
                        format!("expected two positive integers, got {b}"),
                    ))
                }
            }
        }
        None => {
            return Err(Error::config(
                r.path,
                "quantization_config.weight_block_size",
                "required field is missing (only block-scaled FP8 is supported)",
            ))
        }
    };
    Ok(Some(Fp8Spec {
        fmt: fmt.to_string(),
        block,
    }))
}

/// Head dimensions RoPE rotates: `partial_rotary_factor` (top level or in the RoPE parameters)
/// of the head, as transformers rounds it.
fn read_rotary_dim(r: &Reader, head_dim: usize, default: f64) -> Result<usize> {
    let nested = ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|k| get(r.v, k).map(|p| (k, p)));
    let (key, f) = match nested {
        Some((k, p)) if get(p, "partial_rotary_factor").is_some() => (
            format!("{k}.partial_rotary_factor"),
            r.f64_opt(p, "partial_rotary_factor")?.unwrap_or(default),
        ),
        _ => (
            "partial_rotary_factor".to_string(),
            r.f64_opt(r.v, "partial_rotary_factor")?.unwrap_or(default),
        ),
    };
    let key = key.as_str();
    let dim = (head_dim as f64 * f) as usize;
    if !(f > 0.0 && f <= 1.0) || dim < 2 || dim % 2 == 1 {
        return Err(Error::config(
            r.path,
            key,
            format!("{f} gives {dim} rotary dimensions of a {head_dim}-wide head; they must be even and at least 2"),
        ));
    }
    Ok(dim)
}

/// The MoE options of a transformers config: both spellings of the expert count, Qwen's
/// `decoder_sparse_step` and `mlp_only_layers`, and the shared expert.
fn read_moe(r: &Reader, arch: Arch, num_layers: usize) -> Result<Option<MoeSpec>> {
    let style = match arch {
        Arch::Mixtral => MoeStyle::Mixtral,
        Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen35Moe => MoeStyle::Qwen,
        Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => {
            return read_deepseek_moe(r, arch, num_layers)
        }
        Arch::GptOss => return read_gpt_oss_moe(r, num_layers).map(Some),
        _ => return Ok(None),
    };
    let experts = match r.usize_opt("num_local_experts")? {
        Some(n) => n,
        None => r.usize_req("num_experts")?,
    };
    let key = if get(r.v, "num_local_experts").is_some() {
        "num_local_experts"
    } else {
        "num_experts"
    };
    if experts == 0 {
        return Err(Error::config(r.path, key, "must be at least 1"));
    }
    let top_k = r.top_k(experts)?;
    let expert_size = match style {
        MoeStyle::Mixtral => r.usize_req("intermediate_size")?,
        MoeStyle::Qwen | MoeStyle::Deepseek | MoeStyle::GptOss => {
            r.usize_req("moe_intermediate_size")?
        }
    };
    let shared_size = match arch {
        Arch::Qwen2Moe | Arch::Qwen3Next | Arch::Qwen35Moe => r
            .usize_opt("shared_expert_intermediate_size")?
            .filter(|&n| n > 0),
        _ => None,
    };
    let step = r.usize_opt("decoder_sparse_step")?.unwrap_or(1).max(1);
    let dense: Vec<usize> = match get(r.v, "mlp_only_layers") {
        None => vec![],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
            .ok_or_else(|| {
                Error::config(
                    r.path,
                    "mlp_only_layers",
                    "expected a list of layer indices",
                )
            })?,
    };
    if let Some(&bad) = dense.iter().find(|&&l| l >= num_layers) {
        return Err(Error::config(
            r.path,
            "mlp_only_layers",
            format!("layer {bad} is outside the {num_layers} layers"),
        ));
    }
    let sparse = (0..num_layers)
        .map(|l| !dense.contains(&l) && (l + 1) % step == 0)
        .collect();
    Ok(Some(MoeSpec {
        style,
        experts,
        top_k,
        expert_size,
        // Mixtral's softmax over the top-k logits is the renormalized top-k of the softmax.
        // Qwen3.5 always renormalizes (its config has no such key).
        norm_topk: style == MoeStyle::Mixtral
            || arch == Arch::Qwen35Moe
            // transformers defaults Qwen3-Next's to true.
            || r.bool_opt("norm_topk_prob")?.unwrap_or(arch == Arch::Qwen3Next),
        shared_gated: shared_size.is_some(),
        shared_size,
        sparse,
        routing: Routing::softmax(),
        clamped: None,
    }))
}

/// GPT-OSS's experts: `num_local_experts` of `intermediate_size` in every layer, softmax over
/// the top-k logits, and the clamped SwiGLU. Official configs give `swiglu_limit` but not
/// `swiglu_alpha`, which transformers fixes at 1.702.
fn read_gpt_oss_moe(r: &Reader, num_layers: usize) -> Result<MoeSpec> {
    let experts = match r.usize_req("num_local_experts")? {
        0 => {
            return Err(Error::config(
                r.path,
                "num_local_experts",
                "must be at least 1",
            ))
        }
        n => n,
    };
    let positive = |key: &str, v: Option<f64>| -> Result<f32> {
        match v {
            None => Err(Error::config(r.path, key, "required field is missing")),
            Some(x) if x > 0.0 && x.is_finite() => Ok(x as f32),
            Some(x) => Err(Error::config(
                r.path,
                key,
                format!("{x} must be a positive number"),
            )),
        }
    };
    let alpha = positive(
        "swiglu_alpha",
        Some(r.f64_opt(r.v, "swiglu_alpha")?.unwrap_or(1.702)),
    )?;
    let limit = positive("swiglu_limit", r.f64_opt(r.v, "swiglu_limit")?)?;
    Ok(MoeSpec::gpt_oss(
        experts,
        r.top_k(experts)?,
        r.usize_req("intermediate_size")?,
        num_layers,
        ClampedSwiglu { alpha, limit },
    ))
}

impl MoeSpec {
    /// GPT-OSS's experts in every layer (read from transformers' config or GGUF's keys).
    pub fn gpt_oss(
        experts: usize,
        top_k: usize,
        expert_size: usize,
        num_layers: usize,
        clamped: ClampedSwiglu,
    ) -> Self {
        MoeSpec {
            style: MoeStyle::GptOss,
            experts,
            top_k,
            expert_size,
            norm_topk: false,
            shared_size: None,
            shared_gated: false,
            sparse: vec![true; num_layers],
            routing: Routing {
                scoring: Scoring::TopKSoftmax,
                ..Routing::softmax()
            },
            clamped: Some(clamped),
        }
    }
}

/// The field at fault in group-limited routing.
pub(crate) enum GroupFault {
    Groups,
    TopGroups,
    TopK,
}

/// Why `top_k` of `experts` cannot be routed through `top_groups` of `groups` groups, if they
/// cannot: shared by the transformers and GGUF readers, which name the fields their own way.
pub(crate) fn group_fault(
    experts: usize,
    groups: usize,
    top_groups: usize,
    top_k: usize,
) -> Option<(GroupFault, String)> {
    if groups == 0 || !experts.is_multiple_of(groups) {
        return Some((
            GroupFault::Groups,
            format!("{groups} groups do not divide the {experts} experts"),
        ));
    }
    if top_groups == 0 || top_groups > groups {
        return Some((
            GroupFault::TopGroups,
            format!("{top_groups} must be between 1 and the {groups} groups"),
        ));
    }
    let reachable = top_groups * (experts / groups);
    (top_k > reachable).then(|| {
        (
            GroupFault::TopK,
            format!(
                "{top_k} is more than the {reachable} experts of the {top_groups} chosen groups"
            ),
        )
    })
}

/// DeepSeek's MoE options (also GLM-4.5's): `n_routed_experts` experts of
/// `moe_intermediate_size`, `n_shared_experts` always-on ones, dense layers before
/// `first_k_dense_replace` and off the `moe_layer_freq` step, and the routing method.
fn read_deepseek_moe(r: &Reader, arch: Arch, num_layers: usize) -> Result<Option<MoeSpec>> {
    let Some(experts) = r.usize_opt("n_routed_experts")?.filter(|&n| n > 0) else {
        return Ok(None);
    };
    let top_k = r.top_k(experts)?;
    let expert_size = r.usize_req("moe_intermediate_size")?;
    let shared = r.usize_opt("n_shared_experts")?.unwrap_or(0);
    let first_dense = r.usize_opt("first_k_dense_replace")?.unwrap_or(0);
    let freq = r.usize_opt("moe_layer_freq")?.unwrap_or(1).max(1);
    let sparse = (0..num_layers)
        .map(|l| l >= first_dense && l % freq == 0)
        .collect();
    let v3_like = arch != Arch::DeepseekV2;
    // transformers runs V3 and GLM-4.5 as sigmoid + noaux_tc whatever the config says.
    let scoring = match get(r.v, "scoring_func").and_then(|s| s.as_str()) {
        _ if v3_like => Scoring::Sigmoid,
        None | Some("softmax") => Scoring::Softmax,
        Some("sigmoid") => Scoring::Sigmoid,
        Some(other) => {
            return Err(Error::config(
                r.path,
                "scoring_func",
                format!("`{other}` is not supported (supported: softmax, sigmoid)"),
            ))
        }
    };
    let method = if v3_like {
        "noaux_tc"
    } else {
        get(r.v, "topk_method")
            .and_then(|m| m.as_str())
            .unwrap_or("greedy")
    };
    let grouped = |top2_sum: bool| -> Result<Option<ExpertGroups>> {
        let groups = r.usize_opt("n_group")?.unwrap_or(1).max(1);
        let top_groups = r.usize_opt("topk_group")?.unwrap_or(groups);
        if let Some((fault, why)) = group_fault(experts, groups, top_groups, top_k) {
            let key = match fault {
                GroupFault::Groups => "n_group",
                GroupFault::TopGroups => "topk_group",
                GroupFault::TopK => "num_experts_per_tok",
            };
            return Err(Error::config(r.path, key, why));
        }
        if top2_sum && experts / groups < 2 {
            return Err(Error::config(
                r.path,
                "n_group",
                "noaux_tc scores a group by its two best experts; groups need at least 2",
            ));
        }
        Ok((groups > 1).then_some(ExpertGroups {
            groups,
            top_groups,
            top2_sum,
        }))
    };
    let (groups, correction_bias) = match method {
        "greedy" => (None, false),
        "group_limited_greedy" => (grouped(false)?, false),
        "noaux_tc" => (grouped(true)?, true),
        other => {
            return Err(Error::config(
                r.path,
                "topk_method",
                format!(
                    "`{other}` is not supported (supported: greedy, group_limited_greedy, noaux_tc)"
                ),
            ))
        }
    };
    let scale = r.f64_opt(r.v, "routed_scaling_factor")?.unwrap_or(1.0) as f32;
    Ok(Some(MoeSpec {
        style: MoeStyle::Deepseek,
        experts,
        top_k,
        expert_size,
        // As transformers: V2 never renormalizes, whatever `norm_topk_prob` says.
        norm_topk: v3_like && r.bool_opt("norm_topk_prob")?.unwrap_or(false),
        shared_size: (shared > 0).then_some(shared * expert_size),
        shared_gated: false,
        sparse,
        routing: Routing {
            scoring,
            correction_bias,
            groups,
            scale,
        },
        clamped: None,
    }))
}

impl BlockSpec {
    /// Llama's block: no biases, no q/k norm, SiLU, pre-norms only.
    pub fn plain() -> Self {
        BlockSpec {
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            norm_offset: 0.0,
            sandwich_norms: false,
            act: Activation::Silu,
            rope_interleaved: false,
            fused_qkv: false,
            fused_gate_up: false,
            glm_norms: false,
            mlp_norm_post_attention: false,
            sinks: false,
            gate_up_interleaved: false,
            attn_gate: false,
            mla: false,
            q_lora: false,
            kv_b_split: false,
        }
    }
}

/// Gemma 3's two RoPEs: transformers 5 nests them in `rope_parameters` by layer type;
/// transformers 4 has `rope_theta`/`rope_scaling` for global layers and `rope_local_base_freq`.
fn read_gemma3_rope(r: &Reader) -> Result<(RopeConfig, Option<RopeConfig>)> {
    if let Some(p) = get(r.v, "rope_parameters") {
        if let Some(full) = get(p, "full_attention") {
            let global = read_rope(r, Some((full, "rope_parameters.full_attention")))?;
            let local = match get(p, "sliding_attention") {
                Some(s) => read_rope(r, Some((s, "rope_parameters.sliding_attention")))?,
                None => RopeConfig {
                    theta: 10000.0,
                    scaling: RopeScaling::None,
                },
            };
            return Ok((global, Some(local)));
        }
    }
    let global = read_rope(r, None)?;
    let local = RopeConfig {
        theta: r.f64_opt(r.v, "rope_local_base_freq")?.unwrap_or(10000.0) as f32,
        scaling: RopeScaling::None,
    };
    Ok((global, Some(local)))
}

fn read_rope(r: &Reader, nested: Option<(&Value, &str)>) -> Result<RopeConfig> {
    // transformers 5 keeps everything in `rope_parameters`; transformers 4 has `rope_theta` at the
    // top level and optional `rope_scaling`.
    let (params, field) = match nested {
        Some((p, f)) => (Some(p), f),
        None => match get(r.v, "rope_parameters") {
            Some(p) => (Some(p), "rope_parameters"),
            None => (get(r.v, "rope_scaling"), "rope_scaling"),
        },
    };
    let theta = match params.and_then(|p| get(p, "rope_theta")) {
        Some(_) => r.f64_opt(params.unwrap(), "rope_theta")?.unwrap(),
        None => r.f64_opt(r.v, "rope_theta")?.unwrap_or(10000.0),
    } as f32;
    let Some(p) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let kind = get(p, "rope_type")
        .or_else(|| get(p, "type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let need = |key: &str| -> Result<f64> {
        r.f64_opt(p, key)?.ok_or_else(|| {
            Error::config(
                r.path,
                &format!("{field}.{key}"),
                "required field is missing",
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")? as f32,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")? as f32,
            low_freq_factor: need("low_freq_factor")? as f32,
            high_freq_factor: need("high_freq_factor")? as f32,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        },
        "yarn" => {
            let factor = need("factor")?;
            let original = match r.f64_opt(p, "original_max_position_embeddings")? {
                Some(n) => n as usize,
                None => r.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            };
            // As transformers: an explicit attention factor wins; else mscale over
            // mscale_all_dim when both are set, else mscale(factor).
            let mscale = r.f64_opt(p, "mscale")?;
            let mscale_all = r.f64_opt(p, "mscale_all_dim")?;
            let attention_factor = match (r.f64_opt(p, "attention_factor")?, mscale, mscale_all) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, a)
                }
                _ => yarn_mscale(factor, 1.0),
            } as f32;
            RopeScaling::Yarn {
                factor: factor as f32,
                original_max_position_embeddings: original,
                beta_fast: r.f64_opt(p, "beta_fast")?.unwrap_or(32.0),
                beta_slow: r.f64_opt(p, "beta_slow")?.unwrap_or(1.0),
                attention_factor,
                truncate: get(p, "truncate").and_then(|t| t.as_bool()).unwrap_or(true),
                mscale_all_dim: mscale_all,
            }
        }
        "longrope" | "su" => {
            let list = |key: &str| -> Result<Vec<f32>> {
                get(p, key)
                    .and_then(|v| v.as_array())
                    .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                    .ok_or_else(|| {
                        Error::config(
                            r.path,
                            &format!("{field}.{key}"),
                            "required list of numbers is missing",
                        )
                    })
            };
            let (short_factor, long_factor) = (list("short_factor")?, list("long_factor")?);
            if short_factor.len() != long_factor.len() {
                return Err(Error::config(
                    r.path,
                    &format!("{field}.long_factor"),
                    format!(
                        "has {} entries, short_factor {}",
                        long_factor.len(),
                        short_factor.len()
                    ),
                ));
            }
            let original = match r.f64_opt(p, "original_max_position_embeddings")? {
                Some(n) => n as usize,
                None => r.usize_req("original_max_position_embeddings")?,
            };
            let max = r.usize_opt("max_position_embeddings")?.unwrap_or(original);
            // As transformers: the attention factor follows the extension's ratio unless given.
            let factor = r
                .f64_opt(p, "factor")?
                .unwrap_or(max as f64 / original.max(1) as f64);
            let attention_factor = match r.f64_opt(p, "attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            } as f32;
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(Error::config(
                r.path,
                &format!("{field}.rope_type"),
                format!(
                "`{other}` is not supported (supported: default, linear, llama3, longrope, yarn)"
            ),
            ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

impl ModelConfig {
    /// The transformers `config.json` of this config, the inverse of [`Self::from_value`]: the
    /// one writer of that file, for the converter and the synthetic models alike. `dtype` is
    /// the type the weights are stored in (`float32`, `bfloat16`, ...).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        use serde_json::json;
        let cfg = self;
        let rope = |r: &RopeConfig| match &r.scaling {
            RopeScaling::None => json!({"rope_type": "default", "rope_theta": r.theta}),
            RopeScaling::Linear { factor } => {
                json!({"rope_type": "linear", "rope_theta": r.theta, "factor": factor})
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
                mscale_all_dim,
            } => json!({"rope_type": "yarn", "rope_theta": r.theta, "factor": factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                    "beta_fast": beta_fast, "beta_slow": beta_slow,
                    "attention_factor": attention_factor, "truncate": truncate,
                    "mscale_all_dim": mscale_all_dim}),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => json!({"rope_type": "longrope", "rope_theta": r.theta,
                    "short_factor": short_factor, "long_factor": long_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                    "attention_factor": attention_factor,
                    "partial_rotary_factor": cfg.rotary_dim as f64 / cfg.head_dim as f64}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({"rope_type": "llama3", "rope_theta": r.theta, "factor": factor,
                    "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings}),
        };
        let mut v = json!({
            "architectures": [cfg.arch.hf_name()],
            "model_type": cfg.arch.model_type(),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_ids,
            "dtype": dtype,
        });
        if cfg.rotary_dim != cfg.head_dim && cfg.mla.is_none() {
            v["partial_rotary_factor"] = json!(cfg.rotary_dim as f64 / cfg.head_dim as f64);
        }
        if let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = &cfg.rope.scaling
        {
            v["original_max_position_embeddings"] = json!(original_max_position_embeddings);
        }
        if let Some(m) = &cfg.mla {
            v["q_lora_rank"] = json!(m.q_lora_rank);
            v["kv_lora_rank"] = json!(m.kv_lora_rank);
            v["qk_nope_head_dim"] = json!(m.qk_nope_head_dim);
            v["qk_rope_head_dim"] = json!(m.qk_rope_head_dim);
            v["v_head_dim"] = json!(m.v_head_dim);
            v.as_object_mut().map(|o| o.remove("head_dim"));
        }
        if let Some(f) = &cfg.fp8 {
            v["quantization_config"] = json!({"quant_method": "fp8", "fmt": f.fmt,
                "activation_scheme": "dynamic", "weight_block_size": f.block});
        }
        if matches!(cfg.arch, Arch::Glm4 | Arch::Glm4Moe) {
            v["attention_bias"] = json!(cfg.block.qkv_bias);
        }
        if cfg.arch == Arch::Glm4Moe {
            v["use_qk_norm"] = json!(cfg.block.qk_norm);
        }
        if let Some(m) = cfg.moe.as_ref().filter(|m| m.style == MoeStyle::Deepseek) {
            let first_dense = m.sparse.iter().take_while(|s| !**s).count();
            v["n_routed_experts"] = json!(m.experts);
            v["num_experts_per_tok"] = json!(m.top_k);
            v["moe_intermediate_size"] = json!(m.expert_size);
            v["n_shared_experts"] = json!(m.shared_size.map_or(0, |s| s / m.expert_size.max(1)));
            v["first_k_dense_replace"] = json!(first_dense);
            v["moe_layer_freq"] = json!(1);
            v["norm_topk_prob"] = json!(m.norm_topk);
            v["routed_scaling_factor"] = json!(m.routing.scale);
            v["scoring_func"] = json!(match m.routing.scoring {
                Scoring::Softmax | Scoring::TopKSoftmax => "softmax",
                Scoring::Sigmoid => "sigmoid",
            });
            let g = m.routing.groups;
            v["topk_method"] = json!(match (m.routing.correction_bias, g) {
                (true, _) => "noaux_tc",
                (false, Some(_)) => "group_limited_greedy",
                (false, None) => "greedy",
            });
            v["n_group"] = json!(g.map_or(1, |g| g.groups));
            v["topk_group"] = json!(g.map_or(1, |g| g.top_groups));
        } else if let Some(m) = &cfg.moe {
            v["num_experts_per_tok"] = json!(m.top_k);
            v["norm_topk_prob"] = json!(m.norm_topk);
            if matches!(cfg.arch, Arch::Mixtral | Arch::GptOss) {
                v["num_local_experts"] = json!(m.experts);
            } else {
                v["num_experts"] = json!(m.experts);
                v["moe_intermediate_size"] = json!(m.expert_size);
                v["decoder_sparse_step"] = json!(1);
                v["mlp_only_layers"] = json!((0..cfg.num_layers)
                    .filter(|&l| !m.sparse[l])
                    .collect::<Vec<_>>());
            }
            if let Some(sh) = m.shared_size {
                v["shared_expert_intermediate_size"] = json!(sh);
            }
            if let Some(c) = m.clamped {
                v["swiglu_limit"] = json!(c.limit);
                v["swiglu_alpha"] = json!(c.alpha);
            }
        }
        if let Some(l) = &cfg.linear {
            v["linear_num_key_heads"] = json!(l.key_heads);
            v["linear_num_value_heads"] = json!(l.value_heads);
            v["linear_key_head_dim"] = json!(l.key_dim);
            v["linear_value_head_dim"] = json!(l.value_dim);
            v["linear_conv_kernel_dim"] = json!(l.conv_kernel);
            v["layer_types"] = json!(l
                .layers
                .iter()
                .map(|&lin| if lin {
                    "linear_attention"
                } else {
                    "full_attention"
                })
                .collect::<Vec<_>>());
        }
        let windows: Vec<usize> = cfg.layer_windows.iter().flatten().copied().collect();
        match cfg.arch {
            Arch::Gemma3 => {
                v["hidden_activation"] = json!("gelu_pytorch_tanh");
                let local = cfg.rope_local.clone().unwrap_or(RopeConfig {
                    theta: 10000.0,
                    scaling: RopeScaling::None,
                });
                v["rope_parameters"] =
                    json!({"full_attention": rope(&cfg.rope), "sliding_attention": rope(&local)});
                v["query_pre_attn_scalar"] = json!(1.0 / (cfg.attn_scale * cfg.attn_scale));
                v["final_logit_softcapping"] = json!(cfg.final_logit_softcap);
            }
            Arch::Gemma2 => {
                v["hidden_activation"] = json!("gelu_pytorch_tanh");
                v["rope_parameters"] = rope(&cfg.rope);
                v["query_pre_attn_scalar"] = json!(1.0 / (cfg.attn_scale * cfg.attn_scale));
                v["final_logit_softcapping"] = json!(cfg.final_logit_softcap);
                v["attn_logit_softcapping"] = json!(cfg.attn_logit_softcap);
            }
            _ => {
                v["hidden_act"] = json!("silu");
                v["rope_parameters"] = rope(&cfg.rope);
                v["attention_bias"] = json!(cfg.block.qkv_bias);
                if cfg.arch == Arch::Qwen2Moe {
                    v["qkv_bias"] = json!(cfg.block.qkv_bias);
                }
            }
        }
        if let Some(&w) = windows.first() {
            v["sliding_window"] = json!(w);
            v["layer_types"] = json!(cfg
                .layer_windows
                .iter()
                .map(|w| if w.is_some() {
                    "sliding_attention"
                } else {
                    "full_attention"
                })
                .collect::<Vec<_>>());
            if matches!(
                cfg.arch,
                Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe
            ) {
                v["use_sliding_window"] = json!(true);
            }
        } else if cfg.arch.is_gemma() {
            v["sliding_window"] = json!(cfg.max_position_embeddings);
            v["layer_types"] = json!(vec!["full_attention"; cfg.num_layers]);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 100})
    }

    #[test]
    fn old_and_new_rope_keys_agree() {
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let mut new = base();
        new["rope_parameters"] =
            json!({"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0});
        let a = ModelConfig::from_value(Path::new("c.json"), &old).unwrap();
        let b = ModelConfig::from_value(Path::new("c.json"), &new).unwrap();
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_value(Path::new("m/config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("hidden_size"),
            "{e}"
        );
    }

    #[test]
    fn gemma2_alternates_windows_and_checks_softcaps() {
        let mut v = base();
        v["architectures"] = json!(["Gemma2ForCausalLM"]);
        v["num_hidden_layers"] = json!(4);
        v["sliding_window"] = json!(8);
        v["attn_logit_softcapping"] = json!(50.0);
        v["final_logit_softcapping"] = json!(30.0);
        let c = ModelConfig::from_value(Path::new("c.json"), &v).unwrap();
        assert_eq!(c.layer_windows, vec![Some(8), None, Some(8), None]);
        assert_eq!(
            (c.attn_logit_softcap, c.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert!(c.tie_word_embeddings && !c.block.qk_norm && c.block.sandwich_norms);
        v["attn_logit_softcapping"] = json!(-1.0);
        let e = ModelConfig::from_value(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.json") && e.contains("attn_logit_softcapping"),
            "{e}"
        );
    }

    #[test]
    fn phi3_reads_longrope_partial_rotary_and_fused_projections() {
        let mut v = base();
        v["architectures"] = json!(["Phi3ForCausalLM"]);
        v["max_position_embeddings"] = json!(131072);
        v["partial_rotary_factor"] = json!(0.5);
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0, 2.0, 3.0, 4.0],
                                   "long_factor": [2.0, 3.0, 4.0, 5.0]});
        v["original_max_position_embeddings"] = json!(4096);
        v["sliding_window"] = json!(2047);
        let c = ModelConfig::from_value(Path::new("c.json"), &v).unwrap();
        assert_eq!(c.rotary_dim, 8);
        assert!(c.block.fused_qkv && c.block.fused_gate_up);
        assert_eq!(c.layer_windows, vec![Some(2047); 2]);
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = c.rope.scaling
        else {
            panic!("{:?}", c.rope.scaling)
        };
        assert_eq!(original_max_position_embeddings, 4096);
        // transformers: sqrt(1 + ln(131072 / 4096) / ln(4096)).
        assert!(
            (attention_factor - 1.190_239).abs() < 1e-6,
            "{attention_factor}"
        );
        v["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("long_factor");
        let e = ModelConfig::from_value(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling.long_factor"), "{e}");
    }

    #[test]
    fn moe_configs_read_both_expert_count_spellings_and_dense_layers() {
        let mut v = base();
        v["architectures"] = json!(["Qwen3MoeForCausalLM"]);
        v["num_hidden_layers"] = json!(4);
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(2);
        v["moe_intermediate_size"] = json!(32);
        v["mlp_only_layers"] = json!([1]);
        v["decoder_sparse_step"] = json!(1);
        v["norm_topk_prob"] = json!(true);
        let c = ModelConfig::from_value(Path::new("c.json"), &v).unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!((m.experts, m.top_k, m.expert_size), (8, 2, 32));
        assert_eq!(m.sparse, vec![true, false, true, true]);
        assert!(m.norm_topk && m.shared_size.is_none());
        let obj = v.as_object_mut().unwrap();
        obj.remove("num_experts");
        obj.insert("num_local_experts".into(), json!(8));
        let c2 = ModelConfig::from_value(Path::new("c.json"), &v).unwrap();
        assert_eq!(c2.moe, c.moe);
        v["mlp_only_layers"] = json!([9]);
        let e = ModelConfig::from_value(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mlp_only_layers") && e.contains("layer 9"),
            "{e}"
        );
    }

    #[test]
    fn deepseek_configs_read_latent_attention_routing_and_yarn() {
        let mut v = base();
        v["architectures"] = json!(["DeepseekV3ForCausalLM"]);
        v["num_hidden_layers"] = json!(4);
        v["num_key_value_heads"] = json!(4);
        for (k, x) in [
            ("q_lora_rank", json!(24)),
            ("kv_lora_rank", json!(32)),
            ("qk_nope_head_dim", json!(16)),
            ("qk_rope_head_dim", json!(8)),
            ("v_head_dim", json!(16)),
            ("n_routed_experts", json!(8)),
            ("num_experts_per_tok", json!(2)),
            ("moe_intermediate_size", json!(32)),
            ("n_shared_experts", json!(1)),
            ("first_k_dense_replace", json!(1)),
            ("n_group", json!(4)),
            ("topk_group", json!(2)),
            ("norm_topk_prob", json!(true)),
            ("routed_scaling_factor", json!(2.5)),
            (
                "rope_scaling",
                json!({"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                "mscale": 1.0, "mscale_all_dim": 1.0}),
            ),
        ] {
            v[k] = x;
        }
        let c = ModelConfig::from_value(Path::new("c.json"), &v).unwrap();
        let m = c.mla.clone().unwrap();
        assert_eq!((c.head_dim, c.rotary_dim, m.cache_dim()), (24, 8, 40));
        assert_eq!(c.kv_values_per_token(), 40);
        let moe = c.moe.clone().unwrap();
        assert_eq!(moe.sparse, vec![false, true, true, true]);
        assert_eq!(moe.shared_size, Some(32));
        assert!(moe.routing.correction_bias && moe.routing.scoring == Scoring::Sigmoid);
        // 1/sqrt(24) · (0.1 ln 40 + 1)².
        let want = (0.1f64 * 40f64.ln() + 1.0).powi(2) / 24f64.sqrt();
        assert!((c.attn_scale - want).abs() < 1e-12, "{}", c.attn_scale);
        // The config written back reads the same.
        let back = ModelConfig::from_value(Path::new("c.json"), &c.to_hf_json("bfloat16")).unwrap();
        assert_eq!(
            (back.mla, back.moe, back.rope),
            (c.mla.clone(), c.moe.clone(), c.rope.clone())
        );
        assert!((back.attn_scale - c.attn_scale).abs() < 1e-12);
        for (key, bad, needle) in [
            ("n_group", json!(3), "n_group"),
            ("topk_group", json!(5), "topk_group"),
            ("kv_lora_rank", json!(0), "kv_lora_rank"),
        ] {
            let mut b = v.clone();
            b[key] = bad;
            let e = ModelConfig::from_value(Path::new("m/config.json"), &b)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("m/config.json") && e.contains(needle) && !e.contains('\n'),
                "{e}"
            );
        }
        let mut q = v.clone();
        q["quantization_config"] = json!({"quant_method": "fp8", "weight_block_size": [128]});
        let e = ModelConfig::from_value(Path::new("c.json"), &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.weight_block_size"), "{e}");
        q["quantization_config"] = json!({"quant_method": "awq"});
        let e = ModelConfig::from_value(Path::new("c.json"), &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.quant_method"), "{e}");
    }

    #[test]
    fn unknown_arch_lists_supported() {
        let mut v = base();
        v["architectures"] = json!(["FooForCausalLM"]);
        let e = ModelConfig::from_value(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FooForCausalLM") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }
}

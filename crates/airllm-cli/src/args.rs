//! The command line's options, and their translation into the library's: a
//! [`SessionOptions`] and a [`Workload`] for each command that opens a model.

use std::path::PathBuf;

use airllm::generate::{GenerationParams, SamplingParams};
use airllm::session::{Guesses, Prepared, Session, SessionOptions, Workload};
use airllm::util::{fmt_bytes, parse_size};
use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct PullArgs {
    /// ORG/NAME (safetensors weights with their config and tokenizer), ORG/NAME:QUANT (the GGUF
    /// file of that type, e.g. Q4_K_M) or ORG/NAME/FILE.gguf.
    pub model: String,
    /// Branch, tag or commit. Default: main.
    #[arg(long)]
    pub revision: Option<String>,
    /// No progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on. The default accepts local clients only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests. Default: $AIRLLM_API_KEY, else no key.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Sequences served together (each sweep carries all of them); each one's KV cache for the
    /// full context is part of the plan.
    #[arg(long, short = 'P', default_value_t = 8)]
    pub parallel: usize,
    /// Sequences that may wait for a place beyond the running ones; beyond that, requests get
    /// 429.
    #[arg(long, default_value_t = 128)]
    pub queue: usize,
    /// The model id clients name. Default: the model file's or folder's name.
    #[arg(long)]
    pub alias: Option<String>,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The source: a Hugging Face folder or repo id (or a .gguf with --dequantize).
    #[arg(long, short = 'm')]
    pub model: String,
    /// The hub revision of a repo id. Default: main.
    #[arg(long)]
    pub revision: Option<String>,
    /// Storage type of the matrices: q8_0, q4_k, q4_k_m, q5_k, q6_k, q4_0, f16, bf16 or f32.
    /// Norms, biases and other vectors stay f32.
    #[arg(long, short = 'q', default_value = "f16")]
    pub quantize: String,
    /// Write an f32 Hugging Face folder from a GGUF file instead.
    #[arg(long, conflicts_with = "quantize")]
    pub dequantize: bool,
    /// The output .gguf file (or folder, with --dequantize).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per window; the second half of each window is scored. `-c/--ctx-size` sets it too.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows (all by default).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens per sequence (random ids, fixed seed).
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 8)]
    pub gen: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Keep streamed weights in the page cache instead of dropping them after each read.
    #[arg(long)]
    pub keep_page_cache: bool,
    /// Most bytes read for the raw bandwidth measurement. Default: the model's size, up to 2 GiB.
    #[arg(long)]
    pub raw_bytes: Option<String>,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Args)]
pub struct SynthArgs {
    /// A named shape: llama-7b, llama-13b, mistral-7b, qwen2-7b, llama-70b, tiny; mixtures of
    /// experts mixtral-8x7b, qwen3-30b-a3b, tiny-moe, deepseek-v3, kimi-k2, deepseek-v2-lite,
    /// glm-4.5-air, glm-4.5, gpt-oss-20b, gpt-oss-120b; Gated DeltaNet hybrids
    /// qwen3-next-80b-a3b, qwen3.5-35b-a3b.
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Override the number of layers (e.g. a 70B shape with fewer layers).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Experts per MoE layer (MoE shapes only).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts each token is routed to (MoE shapes only).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// bf16, f16, f32, or fp8 (layer matrices in e4m3 with 128×128 block scales, the rest
    /// bf16, as DeepSeek-V3's official checkpoint).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Shard size, like the hub's 5GB.
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (must not exist).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Also write the same weights as a GGUF file (in --dtype), for llama.cpp and GGUF runs.
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// A mixture's routing: random (independent weights), or correlated, a stand-in for real
    /// models' routing in which consecutive layers choose alike, so that the next layer's
    /// experts can be guessed from the current hidden state (about 97% right on the Mixtral
    /// shape, as reported for real models).
    #[arg(long, default_value = "random")]
    pub routing: String,
    /// Under correlated routing, the weight of each token's embedding along its experts'
    /// shared directions: higher makes routing more predictable.
    #[arg(long)]
    pub routing_strength: Option<f32>,
    /// Write only the safetensors headers, with each shard a sparse file of its full size
    /// (reading as zeros): for `inspect` and plans of full-size shapes.
    #[arg(long)]
    pub sparse: bool,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a model folder, or a model on the Hugging Face hub: ORG/NAME, ORG/NAME:QUANT
    /// (one GGUF file by its type) or ORG/NAME/FILE.gguf, taken from the HF cache when there and
    /// downloaded into it when not (see `airllm pull`).
    /// Default: Gemma 3 270M, fetched by scripts/fetch_default_model.sh.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// The hub revision (branch, tag or commit) of a repo id. Default: main.
    #[arg(long)]
    pub revision: Option<String>,
    /// Memory budget, e.g. 512MiB or 6GiB. Default: 90% of available memory.
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Where to compute: cpu, or cuda[:N] (a binary built with the `cuda` feature, see
    /// scripts/build_cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GPU memory budget, e.g. 4GiB: weights stay on the GPU as far as it allows, after the KV
    /// cache, activations and staging slots; the rest is copied from host memory (or disk) for
    /// every token. --max-memory stays the host budget. Default: 90% of the GPU's free memory.
    /// With --device cpu it simulates a device tier in host memory (for testing the tiers).
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// Tokens of context per sequence. Default: prompt plus --max-new-tokens for `run`,
    /// min(2048, the model's maximum) for `chat`.
    #[arg(long = "ctx-size", short = 'c')]
    pub ctx_size: Option<usize>,
    /// Most tokens one sweep carries; longer prompts are prefilled over several sweeps.
    /// Bounds the activation memory, as llama.cpp's --batch-size does. Default: 512 (for `run`
    /// and `bench`, their prompts' tokens up to 512).
    #[arg(long = "batch-size", short = 'b')]
    pub batch_size: Option<usize>,
    /// Print per-layer read, wait and compute times.
    #[arg(long)]
    pub profile: bool,
    /// Run a Hugging Face model compressed to q8_0, q4_k or q4_k_m: converted to GGUF on first use,
    /// cached, and reused while the source is unchanged.
    #[arg(long)]
    pub compress: Option<String>,
    /// Where --compress keeps its conversions. Default: ~/.cache/airllm/compressed.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Hold an f32 Hugging Face checkpoint's resident matrices as f16: half their memory, with
    /// the weights rounded to f16 (not exact against transformers; math stays f32). Streamed
    /// slices are still read as f32. bf16 and f16 checkpoints are always held in their own
    /// form, so it changes nothing for them; GGUF files keep their own types.
    #[arg(long)]
    f16: bool,
    /// Do not read a mixture's experts ahead on a guess. By default the next layer's experts
    /// are guessed while a layer computes and read early wherever the guesses pay (the
    /// tokens are the same either way).
    #[arg(long)]
    pub no_expert_lookahead: bool,
    /// Write each sparse layer's choice of experts to FILE, one JSON line per layer and step
    /// (`{"step", "layer", "experts"}`), to study routing and the cache's policy.
    #[arg(long, value_name = "FILE")]
    pub trace_experts: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct SampleArgs {
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// 1.0 disables.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// 1.0 disables.
    #[arg(
        long = "repeat-penalty",
        alias = "repetition-penalty",
        default_value_t = 1.0
    )]
    pub repeat_penalty: f32,
    /// Random seed; runs with the same seed repeat exactly. Default: random (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Continue past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args, Clone)]
pub struct SpecArgs {
    /// A draft model (.gguf, folder or repo id) with the model's tokenizer, kept resident in
    /// the budget: it guesses the next tokens and one sweep of the model checks them all.
    /// Output is distributed exactly as without it (identical at temperature 0).
    #[arg(long)]
    pub draft: Option<String>,
    /// Most tokens the draft model guesses per sweep (fewer when its guesses are often
    /// rejected or cost more than they save, as measured).
    #[arg(long, default_value_t = 16)]
    pub draft_max: usize,
    /// Guess up to N tokens per sweep from n-gram matches in the sequence's own tokens
    /// (prompt lookup): no second model; pays on summaries, edits and code.
    #[arg(long, value_name = "N", conflicts_with = "draft")]
    pub lookup: Option<usize>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; repeat for a batch.
    #[arg(long, short = 'p', required = true)]
    pub prompt: Vec<String>,
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// One JSON object per prompt on stdout, one per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// For reasoning models (GPT-OSS): do not show the reasoning, only the answer. Shown by
    /// default, dimmed, on stderr.
    #[arg(long)]
    pub hide_reasoning: bool,
    /// For templates that take it (GPT-OSS): low, medium or high.
    #[arg(long, value_parser = ["low", "medium", "high"])]
    pub reasoning_effort: Option<String>,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The model and the options that change the plan, as `run` takes them.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// One JSON object on stdout: the workload and the plan, in bytes.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// The prefill chunk a command that does not know its prompts uses without `-b`.
pub const DEFAULT_CHUNK: usize = 512;

fn size(flag: &str, s: &Option<String>) -> Result<Option<u64>> {
    s.as_deref()
        .map(parse_size)
        .transpose()
        .context(flag.to_string())
}

impl SampleArgs {
    pub fn params(&self, max_new_tokens: usize) -> Result<GenerationParams> {
        let seed = self.seed.unwrap_or_else(SamplingParams::clock_seed);
        let gp = GenerationParams {
            max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                seed,
            },
            stop_strings: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        };
        gp.check()?;
        Ok(gp)
    }

    /// Says which seed a sampling run drew, so it can be repeated.
    pub fn report_seed(&self, gp: &GenerationParams) {
        if self.seed.is_none() && gp.sampling.temperature > 0.0 {
            eprintln!(
                "seed: {} (pass --seed to repeat this run)",
                gp.sampling.seed
            );
        }
    }
}

impl SpecArgs {
    fn guesses(&self) -> Result<Option<Guesses>> {
        if let Some(n) = self.lookup {
            if n == 0 {
                bail!("--lookup must be at least 1");
            }
            return Ok(Some(Guesses::Lookup(n)));
        }
        let Some(model) = &self.draft else {
            return Ok(None);
        };
        if self.draft_max == 0 {
            bail!("--draft-max must be at least 1");
        }
        Ok(Some(Guesses::Draft {
            model: model.clone(),
            max: self.draft_max,
        }))
    }
}

impl ModelArgs {
    /// The library's options for these flags (and `spec`'s, when the command speculates).
    pub fn session_options(&self, spec: Option<&SpecArgs>) -> Result<SessionOptions> {
        if self.batch_size == Some(0) {
            bail!("--batch-size must be at least 1");
        }
        Ok(SessionOptions {
            load: airllm::load::LoadOptions {
                revision: self.revision.clone(),
                compress: self
                    .compress
                    .as_deref()
                    .map(airllm::load::compress_type)
                    .transpose()
                    .context("--compress")?,
                cache_dir: self.cache_dir.clone(),
                f16: self.f16,
                progress: true,
            },
            max_memory: size("--max-memory", &self.max_memory)?,
            device: airllm::device::parse(&self.device).context("--device")?,
            device_memory: size("--gpu-memory", &self.gpu_memory)?,
            guesses: spec.map(SpecArgs::guesses).transpose()?.flatten(),
            expert_lookahead: !self.no_expert_lookahead,
            expert_trace: self.trace_experts.clone(),
            ..Default::default()
        })
    }

    /// A workload of `sequences` over `context` (the model's default when `None`), with
    /// prompts of `prompt_tokens` in all when the command knows them.
    pub fn workload(
        &self,
        context: Option<usize>,
        sequences: usize,
        prompt_tokens: Option<usize>,
    ) -> Workload {
        let chunk = self
            .batch_size
            .unwrap_or_else(|| prompt_tokens.map_or(DEFAULT_CHUNK, |n| n.clamp(1, DEFAULT_CHUNK)));
        Workload {
            context: self.ctx_size.or(context),
            sequences,
            prefill_chunk: chunk,
            score_prompts: false,
        }
    }
}

/// Says which compressed conversion a model runs.
pub fn report_compressed(compressed: &Option<(PathBuf, bool)>) {
    if let Some((file, built)) = compressed {
        let verb = if *built {
            "compressed into"
        } else {
            "using cached"
        };
        eprintln!("{verb} {}", file.display());
    }
}

/// Finds and opens the model and its tokenizer, saying which conversion it runs.
pub fn prepare(m: &ModelArgs, o: &SessionOptions) -> Result<Prepared> {
    let p = Prepared::new(m.model.as_deref(), o)?;
    report_compressed(&p.compressed);
    Ok(p)
}

/// Sizes `p` for `work` and builds its engine, saying on stderr what it opened and the plan.
pub fn start(mut p: Prepared, work: &Workload) -> Result<Session> {
    p.size(work)?;
    if p.budget_defaulted {
        eprintln!(
            "no --max-memory given: using 90% of available memory ({}, and the {} the tokenizer holds)",
            fmt_bytes(p.opts.max_memory.unwrap_or(0).saturating_sub(p.tok_bytes)),
            fmt_bytes(p.tok_bytes)
        );
    }
    if let (Some((path, _, _)), Some(Guesses::Draft { max, .. })) = (&p.draft, &p.options().guesses)
    {
        eprintln!(
            "draft: {} ({} resident, up to {max} guesses per sweep)",
            path.display(),
            fmt_bytes(p.draft_bytes),
        );
    }
    eprintln!(
        "model: {} ({}, {} layers, {} on disk)",
        p.info.dir.display(),
        p.info.cfg.arch.hf_name(),
        p.info.cfg.num_layers,
        fmt_bytes(p.info.sizes.file_bytes)
    );
    let s = Session::start(p)?;
    eprintln!("{}", s.engine().plan());
    Ok(s)
}

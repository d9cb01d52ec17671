//! The `airllm` command: run, chat and inspect. Generated text goes to stdout; the plan, timings
//! and errors go to stderr.

mod report;
mod serve;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use airllm::chat::{ChatTemplate, Message};
use airllm::generate::{
    generate_on, run_requests_on, DraftSource, GenerationParams, Request, SamplingParams,
    Scheduler, Speculator,
};
use airllm::tokenizer::TextTokenizer;
use airllm::util::{fmt_bytes, parse_size};
use airllm::{Engine, EngineOptions, ModelInfo};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[global_allocator]
static ALLOC: airllm::alloc::LargePageAlloc = airllm::alloc::LargePageAlloc;

#[derive(Parser)]
#[command(
    name = "airllm",
    version,
    about = "Run language models larger than memory by streaming layers from disk"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from one or more prompts, batched in one sweep per token.
    Run(RunArgs),
    /// An interactive chat that keeps the conversation.
    Chat(ChatArgs),
    /// Describe a model and the plan a memory budget would give.
    Inspect(InspectArgs),
    /// Write a random-weight model of a named or explicit shape (for memory and speed tests).
    Synth(SynthArgs),
    /// Measure prefill and decode speed, bytes read, I/O wait and peak memory under a budget,
    /// with the disk's raw read bandwidth measured on the model's files in the same run.
    Bench(BenchArgs),
    /// Convert a Hugging Face folder to GGUF (full precision or quantized), or a GGUF file back
    /// to an f32 Hugging Face folder with --dequantize.
    Convert(ConvertArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Download a model from the Hugging Face hub into its cache (HF_HUB_CACHE, else
    /// HF_HOME/hub, else ~/.cache/huggingface/hub): only the files the model needs, resuming
    /// partial downloads. Prints the path to open. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply.
    Pull(PullArgs),
    /// An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
    /// /health); concurrent requests share each layer sweep.
    Serve(ServeArgs),
}

#[derive(Args)]
struct PullArgs {
    /// ORG/NAME (safetensors weights with their config and tokenizer), ORG/NAME:QUANT (the GGUF
    /// file of that type, e.g. Q4_K_M) or ORG/NAME/FILE.gguf.
    model: String,
    /// Branch, tag or commit. Default: main.
    #[arg(long)]
    revision: Option<String>,
    /// No progress bars.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. The default accepts local clients only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests. Default: $AIRLLM_API_KEY, else no key.
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences served together (each sweep carries all of them); each one's KV cache for the
    /// full context is part of the plan.
    #[arg(long, short = 'P', default_value_t = 8)]
    parallel: usize,
    /// Sequences that may wait for a place beyond the running ones; beyond that, requests get
    /// 429.
    #[arg(long, default_value_t = 128)]
    queue: usize,
    /// The model id clients name. Default: the model file's or folder's name.
    #[arg(long)]
    alias: Option<String>,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct ConvertArgs {
    /// The source: a Hugging Face folder or repo id (or a .gguf with --dequantize).
    #[arg(long, short = 'm')]
    model: String,
    /// The hub revision of a repo id. Default: main.
    #[arg(long)]
    revision: Option<String>,
    /// Storage type of the matrices: q8_0, q4_k, q4_k_m, q5_k, q6_k, q4_0, f16, bf16 or f32.
    /// Norms, biases and other vectors stay f32.
    #[arg(long, short = 'q', default_value = "f16")]
    quantize: String,
    /// Write an f32 Hugging Face folder from a GGUF file instead.
    #[arg(long, conflicts_with = "quantize")]
    dequantize: bool,
    /// The output .gguf file (or folder, with --dequantize).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Tokens per window; the second half of each window is scored. `-c/--ctx-size` sets it too.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many windows (all by default).
    #[arg(long)]
    chunks: Option<usize>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens per sequence (random ids, fixed seed).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 8)]
    gen: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Keep streamed weights in the page cache instead of dropping them after each read.
    #[arg(long)]
    keep_page_cache: bool,
    /// Most bytes read for the raw bandwidth measurement. Default: the model's size, up to 2 GiB.
    #[arg(long)]
    raw_bytes: Option<String>,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct SynthArgs {
    /// A named shape: llama-7b, llama-13b, mistral-7b, qwen2-7b, llama-70b, tiny; mixtures of
    /// experts mixtral-8x7b, qwen3-30b-a3b, tiny-moe.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Override the number of layers (e.g. a 70B shape with fewer layers).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    intermediate: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    /// Experts per MoE layer (MoE shapes only).
    #[arg(long)]
    experts: Option<usize>,
    /// Experts each token is routed to (MoE shapes only).
    #[arg(long)]
    top_k: Option<usize>,
    /// bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Shard size, like the hub's 5GB.
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (must not exist).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Also write the same weights as a GGUF file (in --dtype), for llama.cpp and GGUF runs.
    #[arg(long)]
    gguf: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A .gguf file, a model folder, or a model on the Hugging Face hub: ORG/NAME, ORG/NAME:QUANT
    /// (one GGUF file by its type) or ORG/NAME/FILE.gguf, taken from the HF cache when there and
    /// downloaded into it when not (see `airllm pull`).
    /// Default: Gemma 3 270M, fetched by scripts/fetch_default_model.sh.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// The hub revision (branch, tag or commit) of a repo id. Default: main.
    #[arg(long)]
    revision: Option<String>,
    /// Memory budget, e.g. 512MiB or 6GiB. Default: 90% of available memory.
    #[arg(long)]
    max_memory: Option<String>,
    /// Where to compute: cpu, or cuda[:N] (a binary built with the `cuda` feature, see
    /// scripts/build_cuda.sh).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU memory budget, e.g. 4GiB: weights stay on the GPU as far as it allows, after the KV
    /// cache, activations and staging slots; the rest is copied from host memory (or disk) for
    /// every token. --max-memory stays the host budget. Default: 90% of the GPU's free memory.
    /// With --device cpu it simulates a device tier in host memory (for testing the tiers).
    #[arg(long)]
    gpu_memory: Option<String>,
    /// Tokens of context per sequence. Default: prompt plus --max-new-tokens for `run`,
    /// min(2048, the model's maximum) for `chat`.
    #[arg(long = "ctx-size", short = 'c')]
    ctx_size: Option<usize>,
    /// Most tokens one sweep carries; longer prompts are prefilled over several sweeps.
    /// Bounds the activation memory, as llama.cpp's --batch-size does.
    #[arg(long = "batch-size", short = 'b', default_value_t = 512)]
    batch_size: usize,
    /// Print per-layer read, wait and compute times.
    #[arg(long)]
    profile: bool,
    /// Run a Hugging Face model compressed to q8_0, q4_k or q4_k_m: converted to GGUF on first use,
    /// cached, and reused while the source is unchanged.
    #[arg(long)]
    compress: Option<String>,
    /// Where --compress keeps its conversions. Default: ~/.cache/airllm/compressed.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Hold an f32 Hugging Face checkpoint's resident matrices as f16: half their memory, with
    /// the weights rounded to f16 (not exact against transformers; math stays f32). Streamed
    /// slices are still read as f32. bf16 and f16 checkpoints are always held in their own
    /// form, so it changes nothing for them; GGUF files keep their own types.
    #[arg(long)]
    f16: bool,
}

#[derive(Args, Clone)]
struct SampleArgs {
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// 1.0 disables.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// 1.0 disables.
    #[arg(
        long = "repeat-penalty",
        alias = "repetition-penalty",
        default_value_t = 1.0
    )]
    repeat_penalty: f32,
    /// Random seed; runs with the same seed repeat exactly. Default: random (printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Continue past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args, Clone)]
struct SpecArgs {
    /// A draft model (.gguf, folder or repo id) with the model's tokenizer, kept resident in
    /// the budget: it guesses the next tokens and one sweep of the model checks them all.
    /// Output is distributed exactly as without it (identical at temperature 0).
    #[arg(long)]
    draft: Option<String>,
    /// Most tokens the draft model guesses per sweep (fewer when its guesses are often
    /// rejected or cost more than they save, as measured).
    #[arg(long, default_value_t = 16)]
    draft_max: usize,
    /// Guess up to N tokens per sweep from n-gram matches in the sequence's own tokens
    /// (prompt lookup): no second model; pays on summaries, edits and code.
    #[arg(long, value_name = "N", conflicts_with = "draft")]
    lookup: Option<usize>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; repeat for a batch.
    #[arg(long, short = 'p', required = true)]
    prompt: Vec<String>,
    #[arg(long, short = 'n', default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sample: SampleArgs,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// One JSON object per prompt on stdout, one per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sample: SampleArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// The model and the options that change the plan, as `run` takes them.
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AIRLLM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Synth(a) => synth(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Convert(a) => convert(a),
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Serve(a) => serve_cmd(a),
        Cmd::Pull(a) => pull(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn budget(s: &Option<String>) -> Result<Option<u64>> {
    s.as_deref()
        .map(parse_size)
        .transpose()
        .context("--max-memory")
}

fn params(s: &SampleArgs, max_new_tokens: usize) -> Result<GenerationParams> {
    let seed = s.seed.unwrap_or_else(SamplingParams::clock_seed);
    let gp = GenerationParams {
        max_new_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repeat_penalty,
            seed,
        },
        stop_strings: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    };
    gp.check()?;
    Ok(gp)
}

/// How --model, --revision, --compress, --cache-dir and --f16 ask to open the model.
fn load_options(m: &ModelArgs) -> Result<airllm::load::LoadOptions> {
    Ok(airllm::load::LoadOptions {
        revision: m.revision.clone(),
        compress: m
            .compress
            .as_deref()
            .map(airllm::load::compress_type)
            .transpose()
            .context("--compress")?,
        cache_dir: m.cache_dir.clone(),
        f16: m.f16,
        progress: true,
    })
}

/// Says which compressed conversion a model runs.
fn report_compressed(compressed: &Option<(PathBuf, bool)>) {
    if let Some((file, built)) = compressed {
        let verb = if *built {
            "compressed into"
        } else {
            "using cached"
        };
        eprintln!("{verb} {}", file.display());
    }
}

/// The weights to run (the model, or its --compress conversion), without a tokenizer.
fn model_weights(m: &ModelArgs) -> Result<PathBuf> {
    let at = airllm::load::locate(m.model.as_deref(), &load_options(m)?)?;
    report_compressed(&at.compressed);
    Ok(at.weights)
}

/// Opens the model and its tokenizer, and measures what the tokenizer holds (for a 262k
/// vocabulary, over 100 MiB), so the plan can count it against the budget.
fn open_model(m: &ModelArgs) -> Result<(ModelInfo, TextTokenizer, u64)> {
    let l = airllm::load::load(m.model.as_deref(), &load_options(m)?)?;
    report_compressed(&l.compressed);
    Ok((l.info, l.tok, l.tok_bytes))
}

/// The compute device `--device` names.
fn parse_device(s: &str) -> Result<candle_core::Device> {
    airllm::load::parse_device(s).context("--device")
}

/// Sets the device and its budget from --device and --gpu-memory.
fn apply_device(m: &ModelArgs, opts: &mut EngineOptions) -> Result<()> {
    opts.device = parse_device(&m.device)?;
    opts.device_memory = m
        .gpu_memory
        .as_deref()
        .map(parse_size)
        .transpose()
        .context("--gpu-memory")?;
    Ok(())
}

/// The guess source `--draft` or `--lookup` asks for, sized for the engine `opts` describes.
/// A draft model is opened first, so the model's budget is what is left (with --max-memory,
/// its bytes are reserved from the model's budget), and its tokenizer must be the model's.
/// The model's step then returns a row of logits per guess.
fn speculation(
    s: &SpecArgs,
    m: &ModelArgs,
    tok: Option<&TextTokenizer>,
    opts: &mut EngineOptions,
) -> Result<Option<Speculator>> {
    // A verifying sweep carries a row per guess, within the rows computed exactly as alone.
    let most = |opts: &mut EngineOptions, n: usize| {
        let rows = (n + 1).min(airllm::model::attention::ROW_EXACT);
        opts.max_logit_rows = opts.max_logit_rows.max(rows);
        opts.max_step_tokens = opts.max_step_tokens.max(rows);
    };
    if let Some(n) = s.lookup {
        if n == 0 {
            bail!("--lookup must be at least 1");
        }
        most(opts, n);
        return Ok(Some(Speculator::new(DraftSource::Lookup, n)));
    }
    let Some(spec) = &s.draft else {
        return Ok(None);
    };
    if s.draft_max == 0 {
        bail!("--draft-max must be at least 1");
    }
    let path = airllm::hub::resolve(spec, None, true).with_context(|| format!("--draft {spec}"))?;
    if let Some(tok) = tok {
        let theirs = TextTokenizer::open(&path).with_context(|| format!("--draft {spec}"))?;
        if let Some(why) = tok.difference(&theirs) {
            bail!("--draft {spec}: its tokenizer is not the model's: {why}");
        }
    }
    apply_device(m, opts)?;
    let info = ModelInfo::open(&path).with_context(|| format!("--draft {spec}"))?;
    let draft = airllm::generate::speculative::open_draft(info, opts)
        .with_context(|| format!("--draft {spec}"))?;
    let held = draft.plan().total_bytes();
    eprintln!(
        "draft: {} ({} resident, up to {} guesses per sweep)",
        path.display(),
        fmt_bytes(held),
        s.draft_max
    );
    opts.reserved_bytes += held;
    most(opts, s.draft_max);
    Ok(Some(Speculator::new(
        DraftSource::Model(Box::new(draft)),
        s.draft_max,
    )))
}

/// A scheduler, speculating when `spec` is some.
fn scheduler(spec: Option<Speculator>) -> Scheduler {
    match spec {
        Some(s) => Scheduler::with_speculation(s),
        None => Scheduler::new(),
    }
}

fn start_engine(
    info: ModelInfo,
    m: &ModelArgs,
    mut opts: EngineOptions,
    tok_bytes: u64,
) -> Result<Engine> {
    apply_device(m, &mut opts)?;
    // Without --max-memory the budget is read from the available memory after the tokenizer
    // was built, so it is already left out.
    if m.max_memory.is_some() {
        opts.reserved_bytes += tok_bytes;
    } else {
        // The available memory is read after the draft was loaded: it is already left out.
        opts.reserved_bytes = 0;
    }
    if m.max_memory.is_none() {
        eprintln!(
            "no --max-memory given: using 90% of available memory ({})",
            fmt_bytes(airllm::engine::resolve_budget(None)?)
        );
    }
    eprintln!(
        "model: {} ({}, {} layers, {} on disk)",
        info.dir.display(),
        info.cfg.arch.hf_name(),
        info.cfg.num_layers,
        fmt_bytes(info.sizes.file_bytes)
    );
    let engine = Engine::from_info(info, opts)?;
    eprintln!("{}", engine.plan());
    Ok(engine)
}

/// The context of `chat` and `serve`, which do not know their prompts in advance: -c, else
/// min(2048, the model's maximum).
fn interactive_context(m: &ModelArgs, info: &ModelInfo) -> usize {
    m.ctx_size
        .unwrap_or_else(|| airllm::load::default_context(&info.cfg))
}

fn chat_prompt(tok: &TextTokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    Ok(ChatTemplate::of(tok)?.prompt(tok, messages)?)
}

fn run(a: RunArgs) -> Result<()> {
    let (info, tok, tok_bytes) = open_model(&a.model)?;
    let prompts: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| {
            if a.chat {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", p));
                chat_prompt(&tok, &msgs)
            } else {
                Ok(tok.encode(p)?)
            }
        })
        .collect::<Result<_>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let gp = params(&a.sample, a.max_new_tokens)?;
    let context = a
        .model
        .ctx_size
        .unwrap_or(longest.saturating_add(a.max_new_tokens).saturating_add(1));
    let mut opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context,
        max_batch: prompts.len(),
        max_step_tokens: prompts
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            .min(a.model.batch_size)
            .max(prompts.len()),
        max_logit_rows: prompts.len(),
        ..Default::default()
    };
    let spec = speculation(&a.spec, &a.model, Some(&tok), &mut opts)?;
    let mut engine = start_engine(info, &a.model, opts, tok_bytes)?;
    let mut sched = scheduler(spec);
    if a.sample.seed.is_none() && gp.sampling.temperature > 0.0 {
        eprintln!(
            "seed: {} (pass --seed to repeat this run)",
            gp.sampling.seed
        );
    }
    let t = Instant::now();
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let out = generate_on(&mut sched, &mut engine, &tok, &prompts, &gp, |i, piece| {
        // The first prompt streams live; the others print when the batch is done.
        if stream && i == 0 {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let elapsed = t.elapsed();
    let mut stdout = std::io::stdout().lock();
    for (i, (c, p)) in out.iter().zip(&a.prompt).enumerate() {
        if a.json {
            let obj = serde_json::json!({
                "prompt": p,
                "prompt_token_ids": c.prompt_ids,
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason.as_str(),
            });
            writeln!(stdout, "{obj}")?;
        } else if i == 0 {
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{}", c.text)?;
        }
    }
    let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
    report::summary(&engine, generated, elapsed);
    report::speculation(&sched);
    if a.model.profile {
        report::profile(&engine);
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let (info, tok, tok_bytes) = open_model(&a.model)?;
    if tok.chat_template.is_none() {
        bail!("this model has no chat_template in tokenizer_config.json");
    }
    let gp = params(&a.sample, a.max_new_tokens)?;
    let context = interactive_context(&a.model, &info);
    let mut opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context,
        max_batch: 1,
        max_step_tokens: a.model.batch_size.min(context).max(1),
        max_logit_rows: 1,
        ..Default::default()
    };
    let spec = speculation(&a.spec, &a.model, Some(&tok), &mut opts)?;
    let mut engine = start_engine(info, &a.model, opts, tok_bytes)?;
    let mut sched = scheduler(spec);
    if a.sample.seed.is_none() && gp.sampling.temperature > 0.0 {
        eprintln!(
            "seed: {} (pass --seed to repeat this run)",
            gp.sampling.seed
        );
    }
    let mut messages: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    // The conversation's sequence between turns, and the token ids whose keys and values it
    // holds, to reuse the shared prefix each turn.
    let mut seq: Option<airllm::generate::Caches> = None;
    let mut cached: Vec<u32> = Vec::new();
    eprintln!("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let prompt = chat_prompt(&tok, &messages)?;
        let keep = cached
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        let (resume, resume_draft) = match seq.take() {
            Some(c) => (Some((c.seq, keep)), c.draft),
            None => (None, None),
        };
        let req = Request {
            resume,
            resume_draft,
            ..Request::new(prompt.clone(), gp.clone())
        };
        let mut stdout = std::io::stdout();
        let t = Instant::now();
        let out = run_requests_on(&mut sched, &mut engine, &tok, vec![req], |_, piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        });
        let (c, s) = match out {
            Ok(mut list) => list.remove(0),
            Err(e) => {
                // A failed step leaves the cache half-written: drop this turn, start the next
                // from an empty cache, and keep the REPL alive.
                eprintln!("error: {e}");
                messages.pop();
                cached.clear();
                continue;
            }
        };
        println!();
        report::summary(&engine, c.token_ids.len(), t.elapsed());
        report::speculation(&sched);
        seq = Some(s);
        cached = prompt;
        cached.extend(&c.token_ids);
        // The last sampled token was never fed through the model.
        cached.pop();
        messages.push(Message::new("assistant", &c.text));
    }
    if a.model.profile {
        report::profile(&engine);
    }
    Ok(())
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let (info, tok, tok_bytes) = open_model(&a.model)?;
    // A hub model is named by its repo spec, not by its snapshot's commit folder.
    let from_hub =
        a.model.model.as_deref().filter(|m| {
            airllm::hub::RepoSpec::parse(m).is_some() && !std::path::Path::new(m).exists()
        });
    let model_id = a
        .alias
        .clone()
        .or(from_hub.map(str::to_string))
        .unwrap_or_else(|| {
            let p = &info.dir;
            p.file_stem()
                .or(p.file_name())
                .map_or("model".into(), |s| s.to_string_lossy().into_owned())
        });
    let context = interactive_context(&a.model, &info);
    let mut opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context,
        max_batch: a.parallel,
        max_step_tokens: a.model.batch_size.min(context).max(a.parallel),
        max_logit_rows: a.parallel,
        ..Default::default()
    };
    let spec = speculation(&a.spec, &a.model, Some(&tok), &mut opts)?;
    let engine = start_engine(info, &a.model, opts, tok_bytes)?;
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("AIRLLM_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let host: std::net::IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host {}: expected an IP address", a.host))?;
    if !host.is_loopback() && api_key.is_none() {
        eprintln!("serve: listening beyond this machine without an API key (--api-key)");
    }
    let cfg = serve::Config {
        model_id,
        api_key,
        queue: a.queue,
    };
    serve::serve(
        engine,
        scheduler(spec),
        tok,
        cfg,
        std::net::SocketAddr::new(host, a.port),
    )
}

fn inspect(a: InspectArgs) -> Result<()> {
    // The tokenizer is built as `run` builds it, to count what it holds; a folder without
    // one can still be inspected.
    let (info, tok_bytes) = match open_model(&a.model) {
        Ok((info, _tok, n)) => (info, n),
        Err(e) => {
            let weights = model_weights(&a.model)?;
            let info = ModelInfo::open_opts(&weights, false, a.model.f16)?;
            eprintln!("note: no tokenizer counted in the plan ({e:#})");
            (info, 0)
        }
    };
    let dir = info.dir.clone();
    let c = &info.cfg;
    let s = &info.sizes;
    println!("model:        {}", dir.display());
    println!("architecture: {}", c.arch.hf_name());
    println!(
        "parameters:   {} ({:.2} B)",
        s.params,
        s.params as f64 / 1e9
    );
    println!(
        "dtype:        {} (declared: {})",
        s.dtypes.join(", "),
        c.declared_dtype.as_deref().unwrap_or("none")
    );
    println!("on disk:      {}", fmt_bytes(s.file_bytes));
    println!(
        "layers:       {} × {} on disk, {} as held",
        c.num_layers,
        fmt_bytes(s.layer_file_bytes),
        fmt_bytes(s.layer_bytes)
    );
    println!(
        "shape:        hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}",
        c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    let windows: Vec<String> = c
        .layer_windows
        .iter()
        .map(|w| w.map_or("full".into(), |w| w.to_string()))
        .collect();
    println!("attention:    {}", windows.join(" "));
    println!("rope:         {:?}", c.rope);
    println!("tied head:    {}", c.tie_word_embeddings);
    let context = a
        .model
        .ctx_size
        .unwrap_or_else(|| c.max_position_embeddings.min(2048));
    let mut opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context,
        max_batch: a.batch,
        max_step_tokens: a
            .model
            .batch_size
            .min(context.saturating_mul(a.batch))
            .max(a.batch),
        max_logit_rows: a.batch,
        reserved_bytes: if a.model.max_memory.is_some() {
            tok_bytes
        } else {
            0
        },
        ..Default::default()
    };
    apply_device(&a.model, &mut opts)?;
    println!("{}", info.plan(&opts)?);
    Ok(())
}

fn synth(a: SynthArgs) -> Result<()> {
    use airllm::synth::{preset, write_hf, PRESETS};
    use airllm::weights::safetensors::DType;
    let mut shape = preset(&a.shape)
        .with_context(|| format!("--shape `{}` is not one of {}", a.shape, PRESETS.join(", ")))?;
    shape.layers = a.layers.unwrap_or(shape.layers);
    shape.hidden = a.hidden.unwrap_or(shape.hidden);
    shape.intermediate = a.intermediate.unwrap_or(shape.intermediate);
    shape.heads = a.heads.unwrap_or(shape.heads);
    shape.kv_heads = a.kv_heads.unwrap_or(shape.kv_heads);
    shape.vocab = a.vocab.unwrap_or(shape.vocab);
    match (&mut shape.moe, a.experts, a.top_k) {
        (Some(m), e, k) => {
            m.experts = e.unwrap_or(m.experts);
            m.top_k = k.unwrap_or(m.top_k);
            if shape.arch == airllm::config::Arch::Mixtral {
                m.expert_size = shape.intermediate;
            }
        }
        (None, None, None) => {}
        (None, _, _) => bail!(
            "--experts and --top-k apply to mixture-of-experts shapes (mixtral-8x7b, qwen3-30b-a3b, tiny-moe)"
        ),
    }
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        other => bail!("--dtype `{other}`: expected bf16, f16 or f32"),
    };
    let shard = parse_size(&a.shard_size).context("--shard-size")?;
    let bar = airllm::load::byte_bar();
    write_hf(&shape, dtype, a.seed, shard, &a.out, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {} ({shape:?}, {})", a.out.display(), dtype.name());
    if let Some(g) = &a.gguf {
        let quant = match dtype {
            DType::BF16 => airllm::convert::Quant::BF16,
            DType::F16 => airllm::convert::Quant::F16,
            DType::F32 => airllm::convert::Quant::F32,
        };
        let bar = airllm::load::byte_bar();
        airllm::convert::to_gguf(&a.out, quant, g, &[], &mut |d, t| {
            bar.set_length(t);
            bar.set_position(d);
        })?;
        bar.finish_and_clear();
        eprintln!("wrote {}", g.display());
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.batch == 0 {
        bail!("--prompt-len, --gen and --batch must be at least 1");
    }
    let dir = model_weights(&a.model)?;
    let info = ModelInfo::open_opts(&dir, false, a.model.f16)?;
    let vocab = info.cfg.vocab_size as u64;
    let model_bytes = info.sizes.file_bytes;
    let raw_cap = match &a.raw_bytes {
        Some(s) => parse_size(s).context("--raw-bytes")?,
        None => model_bytes.min(2 << 30),
    };
    let files = info.src.files();
    let (raw_n, raw_t, direct) = airllm::bench::raw_read_bandwidth(&files, raw_cap)?;
    let raw_seq = raw_n as f64 / raw_t.as_secs_f64().max(1e-9);
    // Also with the reader's queue depth: the faster of the two is the disk's raw speed.
    let raw_queued = airllm::bench::raw_read_bandwidth_queued(&files, raw_cap, 4)?
        .map(|(n, t)| n as f64 / t.as_secs_f64().max(1e-9));
    let raw_bw = raw_seq.max(raw_queued.unwrap_or(0.0));
    let mut opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context: a.prompt_len + a.gen + 1,
        max_batch: a.batch,
        max_step_tokens: (a.prompt_len * a.batch).min(a.model.batch_size.max(a.batch)),
        max_logit_rows: a.batch,
        keep_page_cache: a.keep_page_cache,
        ..Default::default()
    };
    // The GPU's memory in use before the engine holds anything (context, kernels, cuBLAS).
    let device = parse_device(&a.model.device)?;
    let h2d = airllm::bench::device::h2d_bandwidth(&device, 256 << 20)?;
    let dev_base = airllm::bench::device::used(&device)?;
    airllm::bench::device::pool_peak(&device, true)?;
    // No tokenizer is loaded here, so a draft's is not checked.
    let spec = speculation(&a.spec, &a.model, None, &mut opts)?;
    let mut engine = start_engine(info, &a.model, opts, 0)?;
    let mut dev_peak = 0u64;
    let sample = |dev_peak: &mut u64| -> Result<()> {
        if let (Some(b), Some(u)) = (dev_base, airllm::bench::device::used(&device)?) {
            *dev_peak = (*dev_peak).max(u.saturating_sub(b));
        }
        Ok(())
    };
    sample(&mut dev_peak)?;
    // Deterministic pseudo-random prompts.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| (0..a.prompt_len).map(|_| next()).collect())
        .collect();
    // The scheduler runs it as it runs requests: prefill in chunks of at most --batch-size
    // tokens per sweep, then one sweep per decode step for all sequences. Greedy, past EOS.
    let gp = GenerationParams {
        max_new_tokens: a.gen + 1,
        ignore_eos: true,
        ..Default::default()
    };
    let mut sched = scheduler(spec);
    for p in &prompts {
        sched.submit(Request::new(p.clone(), gp.clone()));
    }
    // The requests that have sampled their first token: prefill ends when all have. Tokens
    // after the first are decode's.
    let mut started = std::collections::HashSet::new();
    let mut decoded = 0usize;
    let tick = |sched: &mut Scheduler,
                engine: &mut Engine,
                started: &mut std::collections::HashSet<_>,
                decoded: &mut usize|
     -> Result<()> {
        for ev in sched.tick(engine, None) {
            match ev {
                airllm::generate::Event::Tokens { id, tokens, .. } => {
                    *decoded += tokens.len() - (started.insert(id) as usize);
                }
                airllm::generate::Event::Failed { error, .. } => return Err(error.into()),
                airllm::generate::Event::Done { .. } => {}
            }
        }
        Ok(())
    };
    let t = Instant::now();
    while started.len() < a.batch {
        tick(&mut sched, &mut engine, &mut started, &mut decoded)?;
    }
    let prefill = t.elapsed();
    // Decode: --gen tokens per sequence, one sweep each (fewer when speculating).
    let read0 = engine.bytes_read();
    let t = Instant::now();
    decoded = 0;
    let mut sweeps = 0usize;
    while !sched.is_idle() {
        tick(&mut sched, &mut engine, &mut started, &mut decoded)?;
        sample(&mut dev_peak)?;
        sweeps += 1;
    }
    let decode = t.elapsed();
    let dev_pool_peak = airllm::bench::device::pool_peak(&device, false)?;
    let read = engine.bytes_read() - read0;
    let d = &engine.decode_profile;
    let per_step = decode.as_secs_f64() / a.gen as f64;
    let eff_bw = read as f64 / decode.as_secs_f64().max(1e-9);
    let report = serde_json::json!({
        "model": dir.display().to_string(),
        "model_bytes": model_bytes,
        "budget_bytes": engine.plan().budget,
        "resident_layers": engine.plan().resident_layers,
        "streamed_layers": engine.plan().streamed_layers,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "prefill_tokens_per_s": (a.prompt_len * a.batch) as f64 / prefill.as_secs_f64().max(1e-9),
        "decode_s_per_token": per_step,
        "decode_tokens_per_s": (a.gen * a.batch) as f64 / decode.as_secs_f64().max(1e-9),
        "bytes_read_per_token": read / a.gen as u64,
        "planned_bytes_read_per_token": engine.plan().bytes_read_per_token,
        "effective_read_bandwidth": eff_bw,
        "io_wait_share": d.total_wait().as_secs_f64() / d.wall.as_secs_f64().max(1e-9),
        "peak_rss_bytes": airllm::util::peak_rss().unwrap_or(0),
        "ledger_peak_bytes": engine.ledger().peak(),
        "raw_read_bandwidth": raw_bw,
        "raw_read_bandwidth_sequential": raw_seq,
        "raw_read_bandwidth_queued": raw_queued,
        "raw_read_bytes": raw_n,
        "raw_read_direct_io": direct,
        "utilization": eff_bw / raw_bw.max(1e-9),
        "page_cache": if a.keep_page_cache { "kept" } else { "dropped after reads" },
    });
    let mut report = report;
    let disk_bound = (read / a.gen as u64) as f64 / raw_bw.max(1.0);
    let mut extra = serde_json::json!({
        "disk_bound_s_per_token": disk_bound,
        "decode_vs_disk_bound": per_step / disk_bound.max(1e-12),
    });
    extra["decode_tokens"] = decoded.into();
    extra["decode_sweeps"] = sweeps.into();
    if let Some(sp) = sched.speculation() {
        let st = &sp.stats;
        extra["speculation"] = serde_json::json!({
            "source": match sp.source {
                DraftSource::Model(_) => "draft",
                DraftSource::Lookup => "lookup",
            },
            "max_draft": sp.max_draft,
            "rounds": st.rounds,
            "drafted": st.drafted,
            "accepted": st.accepted,
            "acceptance_rate": st.acceptance(),
            "tokens_per_sweep": st.tokens_per_sweep(),
            "draft_sweeps": st.draft_sweeps,
            "draft_s": st.draft_time.as_secs_f64(),
        });
    }
    let plan = engine.plan();
    if plan.experts_total > 0 {
        let e = &d.experts;
        let per = |n: u64| n as f64 / a.gen as f64;
        extra["experts_total"] = plan.experts_total.into();
        extra["expert_cache_slots"] = plan.expert_slots.into();
        extra["expert_cache_bytes"] = (plan.expert_slots as u64 * plan.expert_bytes).into();
        extra["expert_hit_rate"] = e.hit_rate().into();
        extra["experts_used_per_token"] = per(e.hits + e.misses).into();
        extra["experts_read_per_token"] = per(e.misses).into();
        extra["expert_bytes_read_per_token"] = (e.bytes_read / a.gen as u64).into();
        extra["cold_cache_bytes_read_per_token"] = plan.bytes_read_per_token.into();
    }
    if let (Some(r), Some(e)) = (report.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    if let Some(dp) = &engine.plan().device {
        let moved = d.moved / d.steps.max(1) as u64;
        // The slower link bounds a token: host→GPU for what is not resident there, and
        // disk→host for what is not held in host memory either.
        let disk_s = (read / a.gen as u64) as f64 / raw_bw.max(1.0);
        let bound = h2d.map(|bw| (moved as f64 / bw.max(1.0)).max(disk_s));
        let link = h2d.map(|bw| {
            if disk_s > moved as f64 / bw.max(1.0) {
                "disk→host"
            } else {
                "host→device"
            }
        });
        let peak = dev_pool_peak.unwrap_or(0).max(dev_peak);
        let extra = serde_json::json!({
            "device": a.model.device,
            "device_budget_bytes": dp.budget,
            "device_resident_layers": dp.resident_layers,
            "device_head_resident": dp.head_resident,
            "bytes_moved_per_token": moved,
            "planned_bytes_moved_per_token": dp.bytes_moved_per_token,
            "h2d_bandwidth_pinned": h2d,
            "decode_bound_s_per_token": bound,
            "decode_bound_link": link,
            "decode_vs_bound": bound.map(|b| per_step / b.max(1e-12)),
            "device_peak_bytes": if device.is_cpu() { None } else { Some(peak) },
            "device_peak_sampled_bytes": dev_base.map(|_| dev_peak),
            "device_pool_peak_bytes": dev_pool_peak,
            "device_ledger_peak_bytes": engine.device_ledger().map(|l| l.peak()),
        });
        if let (Some(r), Some(e)) = (report.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
    }
    if a.json {
        println!("{report}");
    } else {
        let gb = |b: f64| format!("{:.2} GB/s", b / 1e9);
        println!("| metric | value |");
        println!("|---|---|");
        println!(
            "| prefill | {:.1} tokens/s |",
            report["prefill_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| decode | {per_step:.3} s/step ({:.2} tokens/s at batch {}) |",
            report["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            a.batch
        );
        println!(
            "| bytes read per token | {} |",
            fmt_bytes(read / a.gen as u64)
        );
        println!("| effective read bandwidth | {} |", gb(eff_bw));
        if let Some(sp) = report.get("speculation") {
            println!(
                "| speculation ({}) | {:.1}% of guesses accepted, {:.2} tokens per sweep |",
                sp["source"].as_str().unwrap_or("?"),
                100.0 * sp["acceptance_rate"].as_f64().unwrap_or(0.0),
                sp["tokens_per_sweep"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(m) = report["bytes_moved_per_token"].as_u64() {
            println!("| bytes moved host→device per token | {} |", fmt_bytes(m));
            if let Some(bw) = report["h2d_bandwidth_pinned"].as_f64() {
                println!("| pinned host→device bandwidth | {} |", gb(bw));
            }
            if let Some(b) = report["decode_bound_s_per_token"].as_f64() {
                println!(
                    "| decode vs the slower link's bound ({}) | {per_step:.3} / {b:.3} s = {:.2}× |",
                    report["decode_bound_link"].as_str().unwrap_or("?"),
                    per_step / b.max(1e-12)
                );
            }
            if let Some(p) = report["device_peak_bytes"].as_u64() {
                println!(
                    "| device memory peak | {} of {} |",
                    fmt_bytes(p),
                    fmt_bytes(report["device_budget_bytes"].as_u64().unwrap_or(0))
                );
            }
        }
        println!(
            "| decode vs the disk's bound (bytes read / raw bandwidth) | {per_step:.3} / {disk_bound:.3} s = {:.2}× |",
            per_step / disk_bound.max(1e-12)
        );
        if let Some(rate) = report["expert_hit_rate"].as_f64() {
            println!(
                "| experts per token: used, read, hit rate | {:.1}, {:.1}, {:.0}% ({} cache slots of {}) |",
                report["experts_used_per_token"].as_f64().unwrap_or(0.0),
                report["experts_read_per_token"].as_f64().unwrap_or(0.0),
                100.0 * rate,
                report["expert_cache_slots"],
                report["experts_total"]
            );
            println!(
                "| expert bytes read per token | {} |",
                fmt_bytes(report["expert_bytes_read_per_token"].as_u64().unwrap_or(0))
            );
        }
        println!(
            "| compute waiting for I/O | {:.0}% |",
            100.0 * report["io_wait_share"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| peak RSS (VmHWM) | {} |",
            fmt_bytes(report["peak_rss_bytes"].as_u64().unwrap_or(0))
        );
        println!(
            "| raw sequential read, one 16 MiB request at a time ({}) | {} |",
            if direct {
                "O_DIRECT"
            } else {
                "buffered, cache dropped"
            },
            gb(raw_seq)
        );
        if let Some(q) = raw_queued {
            println!(
                "| raw read, 4 × 4 MiB requests in flight (O_DIRECT) | {} |",
                gb(q)
            );
        }
        println!(
            "| utilization (effective / raw) | {:.0}% |",
            100.0 * eff_bw / raw_bw.max(1e-9)
        );
    }
    if a.model.profile {
        report::profile(&engine);
    }
    Ok(())
}

fn pull(a: PullArgs) -> Result<()> {
    let path = airllm::hub::update(&a.model, a.revision.as_deref(), !a.quiet)?;
    println!("{}", path.display());
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let src = airllm::hub::resolve(&a.model, a.revision.as_deref(), true)?;
    let bar = airllm::load::byte_bar();
    let mut progress = |d: u64, t: u64| {
        bar.set_length(t);
        bar.set_position(d);
    };
    let t = Instant::now();
    if a.dequantize {
        airllm::convert::to_hf(&src, &a.out, &mut progress)?;
    } else {
        let quant: airllm::convert::Quant = a.quantize.parse().context("--quantize")?;
        airllm::convert::to_gguf(&src, quant, &a.out, &[], &mut progress)?;
    }
    bar.finish_and_clear();
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    // `-c/--ctx-size` means the window here, as in llama-perplexity.
    let ctx = a.model.ctx_size.unwrap_or(a.ctx);
    let (info, tok, tok_bytes) = open_model(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("{}: cannot read", a.file.display()))?;
    let mut tokens = tok.encode(&text)?;
    // As llama.cpp: BOS replaces each window's first token when the model adds BOS.
    let bos = tok.bos_id.filter(|b| tokens.first() == Some(b));
    if let Some(n) = a.chunks {
        tokens.truncate(n * ctx);
    }
    let opts = EngineOptions {
        max_memory: budget(&a.model.max_memory)?,
        context: ctx,
        max_batch: 1,
        max_step_tokens: a.model.batch_size.min(ctx).max(1),
        max_logit_rows: a.model.batch_size.min(ctx).max(1),
        ..Default::default()
    };
    let mut engine = start_engine(info, &a.model, opts, tok_bytes)?;
    eprintln!(
        "{} tokens, {} windows of {}",
        tokens.len(),
        tokens.len() / ctx,
        ctx
    );
    let t = Instant::now();
    let r = airllm::generate::perplexity::perplexity(&mut engine, &tokens, ctx, bos, |i, n, p| {
        eprint!("[{i}/{n}] {p:.4} ");
    })?;
    eprintln!();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = serde_json::json!(secs);
        v["tokens_per_s"] = serde_json::json!((r.windows * r.ctx) as f64 / secs.max(1e-9));
        println!("{v}");
    } else {
        println!(
            "perplexity {:.4} over {} windows of {} tokens ({} scored) in {:.1} s",
            r.ppl, r.windows, r.ctx, r.scored, secs
        );
    }
    if a.model.profile {
        report::profile(&engine);
    }
    Ok(())
}

//! The `airllm` command: each subcommand is a file in [`cmd`], and [`args`] turns flags into the
//! library's options. Generated text goes to stdout; the plan, timings and errors go to stderr.

mod args;
mod cmd;
mod report;
mod serve;

use std::process::ExitCode;

use args::*;
use clap::{Parser, Subcommand};

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
        Cmd::Run(a) => cmd::run::run(a),
        Cmd::Chat(a) => cmd::chat::chat(a),
        Cmd::Inspect(a) => cmd::inspect::inspect(a),
        Cmd::Synth(a) => cmd::files::synth(a),
        Cmd::Bench(a) => cmd::bench::bench(a),
        Cmd::Convert(a) => cmd::files::convert(a),
        Cmd::Perplexity(a) => cmd::perplexity::perplexity(a),
        Cmd::Serve(a) => cmd::serve::serve(a),
        Cmd::Pull(a) => cmd::files::pull(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The library names its fields; the draft's is a flag here.
            match e.downcast_ref::<airllm::Error>() {
                Some(airllm::Error::Draft { spec, source }) => {
                    eprintln!("error: --draft {spec}: {source}")
                }
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

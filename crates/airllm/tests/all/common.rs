#![allow(dead_code)]
//! Shared helpers for the fixture tests.

#[path = "../../../../tests/support/broken.rs"]
pub mod broken;

use std::path::PathBuf;

/// `rel` under the repository's `tests/fixtures` (the one place that names the folder).
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// The transformers fixture models.
pub fn fixtures() -> PathBuf {
    fixture("hf")
}

pub const MODELS: &[&str] = &[
    "llama-gqa2-llama3rope",
    "llama-mqa-tied-linear-bf16",
    "mistral-sliding-window",
    "qwen2-bias-mha-sharded",
    "qwen3-qknorm-headdim",
    "gemma3-sliding-global",
    "gemma2-softcap-alternating",
    "qwen2moe-shared-expert",
    "qwen3moe-dense-layer",
    "mixtral-moe",
    "qwen3moe-sparse",
    "phi-three-longrope-partial",
    "deepseek-v2-mla-grouped",
    "deepseek-v2-lite-27l",
    "deepseek-v3-mla-noaux-yarn",
    "deepseek-v3-fp8-block",
    "glm4moe-partial-rotary",
    "glm4-dense",
    "qwen3-fp8-block",
    "qwen3-fp8-e5m2",
    "gpt-oss-mxfp4",
    "gpt-oss-bf16-experts",
    "qwen3next-hybrid",
    "qwen3_5moe-hybrid",
    "qwen3_5-dense-hybrid",
];

pub struct Reference {
    pub prompt_ids: Vec<Vec<u32>>,
    pub prompts: Vec<String>,
    pub greedy: Vec<Vec<u32>>,
    pub logits: Vec<Vec<Vec<f32>>>,
    pub json: serde_json::Value,
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

pub fn reference(name: &str) -> Reference {
    reference_at(&fixtures().join(name))
}

/// The goldens of the fixture in `dir`.
pub fn reference_at(dir: &std::path::Path) -> Reference {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let prompt_ids = ids(&json["prompt_token_ids"]);
    let logits = (0..prompt_ids.len())
        .map(|i| t[&format!("logits_{i}")].to_vec2::<f32>().unwrap())
        .collect();
    Reference {
        prompts: json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
        greedy: ids(&json["greedy_token_ids"]),
        prompt_ids,
        logits,
        json,
    }
}

/// A JSON list of token ids.
pub fn id_list(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON list of numbers.
pub fn float_list(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Every prompt as a new sequence, in one batched step; each sequence's logits per `which`.
pub fn step_prompts(
    e: &mut airllm::Engine,
    prompts: &[Vec<u32>],
    which: airllm::LogitsFor,
) -> Vec<candle_core::Tensor> {
    let mut seqs: Vec<_> = prompts.iter().map(|_| e.new_sequence().unwrap()).collect();
    let mut batch: Vec<_> = seqs
        .iter_mut()
        .zip(prompts)
        .map(|(s, p)| (s, p.as_slice()))
        .collect();
    e.step(&mut batch, which).unwrap()
}

/// Last-position logits of every prompt, in one batched step.
pub fn last_logits(e: &mut airllm::Engine, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    step_prompts(e, prompts, airllm::LogitsFor::Last)
        .into_iter()
        .map(|t| t.squeeze(0).unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Completions of `prompts` in one batch on `sched` (each prompt its own random stream).
pub fn complete(
    sched: &mut airllm::generate::Scheduler,
    e: &mut airllm::Engine,
    tok: &airllm::tokenizer::TextTokenizer,
    prompts: &[Vec<u32>],
    p: &airllm::generate::GenerationParams,
) -> Vec<airllm::generate::Completion> {
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(i, x)| airllm::generate::Request {
            stream: i as u64,
            ..airllm::generate::Request::new(x.clone(), p.clone())
        })
        .collect();
    sched
        .run(e, Some(tok), reqs, |_| Ok(()))
        .unwrap()
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

/// `n` greedy tokens per prompt, past EOS, in one batch.
pub fn greedy(
    e: &mut airllm::Engine,
    tok: &airllm::tokenizer::TextTokenizer,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    let p = airllm::generate::GenerationParams {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    complete(&mut airllm::generate::Scheduler::new(), e, tok, prompts, &p)
        .into_iter()
        .map(|c| c.token_ids)
        .collect()
}

/// The `prompt_token_ids` of a JSON reference.
pub fn prompt_ids(r: &serde_json::Value) -> Vec<Vec<u32>> {
    r["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_list)
        .collect()
}

/// Options for one batched step over `prompts` (a 1 GiB budget), with the last row of logits
/// per prompt, or every row when `all_rows`.
pub fn batch_options(
    prompts: &[Vec<u32>],
    context: usize,
    all_rows: bool,
) -> airllm::EngineOptions {
    let total: usize = prompts.iter().map(Vec::len).sum();
    // Room for the longest prompt and 16 new tokens.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let rows = if all_rows { total } else { prompts.len() };
    small_options(context.max(longest + 16), prompts.len(), total, rows)
}

/// Options with a 1 GiB budget and the given context, batch, tokens per step and logit rows.
pub fn small_options(
    context: usize,
    max_batch: usize,
    max_step_tokens: usize,
    max_logit_rows: usize,
) -> airllm::EngineOptions {
    airllm::EngineOptions {
        max_memory: Some(1 << 30),
        context,
        max_batch,
        max_step_tokens,
        max_logit_rows,
        ..Default::default()
    }
}

/// One step of one sequence over `tokens`: its logits, one row per row asked for.
pub fn feed(
    e: &mut airllm::Engine,
    seq: &mut airllm::Sequence,
    tokens: &[u32],
    rows: airllm::LogitsFor,
) -> Vec<Vec<f32>> {
    e.step(&mut [(seq, tokens)], rows).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap()
}

/// The smallest budget the plan accepts for `opts`, found by asking with a budget of one byte.
pub fn minimum(info: &airllm::ModelInfo, opts: &airllm::EngineOptions) -> u64 {
    match info.plan(opts) {
        Err(airllm::Error::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!("expected a minimum, got {:?}", other.map(|p| p.budget)),
    }
}

/// The smallest budget, from `from` up, at which `layers` of the plan reach `want`.
pub fn budget_for(from: u64, step: u64, want: usize, layers: impl Fn(u64) -> usize) -> u64 {
    let mut b = from;
    for _ in 0..10_000 {
        if layers(b) >= want {
            return b;
        }
        b += step;
    }
    panic!("no budget from {from} gives {want} layers");
}

/// Options with one layer on the device and one in host memory; the rest from disk.
pub fn tiered(path: &std::path::Path, base: &airllm::EngineOptions) -> airllm::EngineOptions {
    let info = airllm::ModelInfo::open(path).unwrap();
    let step = (info.sizes.layer_bytes / 16).max(1);
    let mut o = base.clone();
    o.max_memory = Some(1 << 40);
    o.device_memory = Some(1);
    let dmin = minimum(&info, &o);
    let d = budget_for(dmin, step, 1, |b| {
        let mut t = o.clone();
        t.device_memory = Some(b);
        info.plan(&t).unwrap().device.unwrap().resident_layers
    });
    o.device_memory = Some(d);
    o.max_memory = Some(1);
    let hmin = minimum(&info, &o);
    let h = budget_for(hmin, step, 1, |b| {
        let mut t = o.clone();
        t.max_memory = Some(b);
        info.plan(&t).unwrap().resident_layers
    });
    o.max_memory = Some(h);
    o
}

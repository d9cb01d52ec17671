//! Speculative decoding: guesses from a draft model or from n-gram lookup never change greedy
//! output (transformers' greedy tokens, with guesses rejected and caches rolled back, sliding
//! windows and experts included), and sampling with a draft that disagrees with the model
//! still draws from the model's distribution.

use crate::common;

use std::path::Path;

use crate::common::{feed, fixtures, reference};
use airllm::generate::{
    DraftSource, GenerationParams, Request, Sampler, SamplingParams, Scheduler, Speculator,
};
use airllm::session::open_draft;
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, LogitsFor, ModelInfo};

fn options(batch: usize) -> EngineOptions {
    EngineOptions {
        max_memory: Some(1 << 30),
        context: 96,
        max_batch: batch,
        max_step_tokens: 128,
        max_logit_rows: 16,
        // As a session speculating 15 tokens sets it: linear layers can take a step back.
        rollback_rows: 16,
        ..Default::default()
    }
}

fn draft(dir: &Path, opts: &EngineOptions, most: usize) -> Speculator {
    let e = open_draft(ModelInfo::open(dir).unwrap(), opts).unwrap();
    Speculator::new(DraftSource::Model(Box::new(e)), most)
}

/// Greedy tokens of every prompt of the fixture `name`, batched and one at a time, with
/// guesses from `source()`; each must be transformers' greedy output. Returns the guesses
/// made and accepted.
fn check_greedy(name: &str, source: impl Fn(&EngineOptions) -> Speculator) -> (usize, usize) {
    let r = reference(name);
    let dir = fixtures().join(name);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let n = r.greedy[0].len();
    let p = GenerationParams {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let (mut drafted, mut accepted) = (0, 0);
    let batched = (0..r.prompt_ids.len()).map(|i| vec![i]);
    let groups: Vec<Vec<usize>> = std::iter::once((0..r.prompt_ids.len()).collect())
        .chain(batched)
        .collect();
    for group in groups {
        let opts = options(group.len());
        let mut engine = Engine::open(&dir, opts.clone()).unwrap();
        let mut sched = Scheduler::with_speculation(source(&opts));
        let prompts: Vec<Vec<u32>> = group.iter().map(|&i| r.prompt_ids[i].clone()).collect();
        let out = common::complete(&mut sched, &mut engine, &tok, &prompts, &p);
        for (c, &i) in out.iter().zip(&group) {
            assert_eq!(
                c.token_ids,
                r.greedy[i],
                "{name}: prompt {i} in a batch of {}",
                group.len()
            );
        }
        let st = sched.speculation().unwrap().stats;
        drafted += st.drafted;
        accepted += st.accepted;
    }
    (drafted, accepted)
}

#[test]
fn greedy_output_with_guesses_is_transformers_greedy() {
    let f = fixtures();
    // A draft of another architecture (same tokenizer, other random weights) is mostly wrong:
    // many rejections and rollbacks, sliding windows included.
    let pairs = [
        ("llama-gqa2-llama3rope", "mistral-sliding-window"),
        ("mistral-sliding-window", "llama-gqa2-llama3rope"),
        ("gemma3-sliding-global", "gemma2-softcap-alternating"),
        ("mixtral-moe", "qwen3moe-sparse"),
        ("qwen2-bias-mha-sharded", "llama-mqa-tied-linear-bf16"),
        // Recurrent states rolled back, as the target and as the draft.
        ("qwen3next-hybrid", "qwen3_5-dense-hybrid"),
        ("qwen3_5moe-hybrid", "llama-gqa2-llama3rope"),
        ("llama-gqa2-llama3rope", "qwen3next-hybrid"),
    ];
    let (mut drafted, mut accepted) = (0, 0);
    for (target, d) in pairs {
        let (a, b) = check_greedy(target, |o| draft(&f.join(d), o, 16));
        drafted += a;
        accepted += b;
        // A draft that is the model itself: every guess is kept.
        let (a, b) = check_greedy(target, |o| draft(&f.join(target), o, 16));
        assert_eq!(a, b, "{target}: its own guesses must all be accepted");
        assert!(a > 0, "{target}: no guesses were made");
    }
    assert!(
        accepted > 0 && accepted < drafted,
        "want both outcomes: {accepted} of {drafted} guesses accepted"
    );
    let (mut drafted, mut accepted) = (0, 0);
    for name in [
        "llama-gqa2-llama3rope",
        "gemma3-sliding-global",
        "qwen3moe-sparse",
        "qwen3next-hybrid",
        "qwen3_5moe-hybrid",
    ] {
        let (a, b) = check_greedy(name, |_| Speculator::new(DraftSource::Lookup, 8));
        drafted += a;
        accepted += b;
    }
    assert!(
        accepted > 0 && accepted < drafted,
        "lookup: want both outcomes, {accepted} of {drafted} guesses accepted"
    );
}

/// A hybrid model's sequence takes back rejected guesses by replaying the kept ones from the
/// state before the verifying step, not by starting over, and then computes what plain
/// decoding does, bit for bit. Without room for that (`rollback_rows` 0) it starts over.
#[test]
fn a_recurrent_state_takes_back_guesses_without_starting_over() {
    let name = "qwen3next-hybrid";
    let r = reference(name);
    let prompt = &r.prompt_ids[0];
    let guesses = &r.greedy[0][..5];
    let mut engine = Engine::open(&fixtures().join(name), options(1)).unwrap();
    // Plain: the prompt, then the first two greedy tokens one at a time.
    let mut plain = engine.new_sequence().unwrap();
    feed(&mut engine, &mut plain, prompt, LogitsFor::Last);
    feed(&mut engine, &mut plain, &guesses[..1], LogitsFor::Last);
    let want = feed(&mut engine, &mut plain, &guesses[1..2], LogitsFor::Last);
    // Speculative: five guesses verified in one step, two kept.
    let mut spec = engine.new_sequence().unwrap();
    feed(&mut engine, &mut spec, prompt, LogitsFor::Last);
    feed(&mut engine, &mut spec, guesses, LogitsFor::All);
    let keep = prompt.len() + 1;
    assert_eq!(spec.truncate(keep), keep);
    let got = feed(&mut engine, &mut spec, &guesses[1..2], LogitsFor::Last);
    assert_eq!(got, want);
    // With no journal the state cannot go back: the sequence starts over.
    let mut engine = Engine::open(
        &fixtures().join(name),
        EngineOptions {
            rollback_rows: 0,
            ..options(1)
        },
    )
    .unwrap();
    let mut s = engine.new_sequence().unwrap();
    feed(&mut engine, &mut s, prompt, LogitsFor::Last);
    feed(&mut engine, &mut s, guesses, LogitsFor::All);
    assert_eq!(s.truncate(keep), 0);
}

/// A small uniform generator for the randomized probability integral transform.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Kolmogorov–Smirnov distance between `u` and the uniform distribution on [0, 1).
fn ks_uniform(mut u: Vec<f64>) -> f64 {
    u.sort_by(f64::total_cmp);
    let n = u.len() as f64;
    u.iter()
        .enumerate()
        .map(|(i, &x)| (x - i as f64 / n).abs().max(((i + 1) as f64 / n - x).abs()))
        .fold(0.0, f64::max)
}

/// The second generated token goes through verification (the first comes from the prompt's
/// last row). With a draft of other weights, its tokens must still follow the model's own
/// distribution given the first: each sample's randomized CDF value under that exact
/// distribution is uniform, which a Kolmogorov–Smirnov test checks (threshold at a
/// false-alarm rate near 1e-4). Without the correction (every guess kept) the test fails.
#[test]
fn sampling_with_a_draft_keeps_the_models_distribution() {
    let f = fixtures();
    let name = "llama-gqa2-llama3rope";
    let dir = f.join(name);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let prompt = reference(name).prompt_ids[1].clone();
    let runs = 3000;
    for sampling in [
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.0,
            ..Default::default()
        },
    ] {
        let opts = options(4);
        let mut engine = Engine::open(&dir, opts.clone()).unwrap();
        // One guess at every chance, whatever it costs.
        let mut spec = draft(&f.join("mistral-sliding-window"), &opts, 4);
        spec.min_draft = 1;
        let mut sched = Scheduler::with_speculation(spec);
        let p = GenerationParams {
            max_new_tokens: 3,
            ignore_eos: true,
            sampling: sampling.clone(),
            ..Default::default()
        };
        let mut ids = Vec::new();
        let mut pairs = std::collections::HashMap::new();
        // In waves of four that prefill together: guesses ride on sweeps that only decode.
        for wave in 0..runs / 4 {
            for s in 4 * wave..4 * wave + 4 {
                let mut p = p.clone();
                p.sampling.seed = s as u64;
                ids.push(sched.submit(Request::new(prompt.clone(), p)));
            }
            while !sched.is_idle() {
                for ev in sched.tick(&mut engine, Some(&tok)) {
                    match ev {
                        airllm::generate::Event::Done { id, completion, .. } => {
                            let t = completion.token_ids;
                            pairs.insert(id, (t[0], t[1]));
                        }
                        airllm::generate::Event::Failed { error, .. } => panic!("{error}"),
                        _ => {}
                    }
                }
            }
        }
        let st = sched.speculation().unwrap().stats;
        assert!(
            st.drafted > runs / 2 && st.accepted < st.drafted,
            "{st:?}: the second token must mostly come from verification, with rejections"
        );
        // The model's exact distribution of the second token, given each first token.
        let mut exact = std::collections::HashMap::new();
        let shaper = Sampler::new(sampling.clone(), 0);
        let mut rng = Lcg(7);
        let mut u = Vec::with_capacity(runs);
        for id in ids {
            let (t1, t2) = pairs[&id];
            let dist = exact.entry(t1).or_insert_with(|| {
                let mut seq = engine.new_sequence().unwrap();
                let mut fed = prompt.clone();
                fed.push(t1);
                let l = engine
                    .step(&mut [(&mut seq, fed.as_slice())], LogitsFor::Last)
                    .unwrap();
                let row: Vec<f32> = l[0].squeeze(0).unwrap().to_vec1().unwrap();
                let d = shaper.distribution(&row, &[]);
                (0..row.len() as u32)
                    .map(|t| d.prob(t) as f64)
                    .collect::<Vec<f64>>()
            });
            let below: f64 = dist[..t2 as usize].iter().sum();
            u.push(below + rng.next() * dist[t2 as usize]);
        }
        let d = ks_uniform(u);
        let limit = 2.2 / (runs as f64).sqrt();
        assert!(
            d < limit,
            "{sampling:?}: KS distance {d:.4} over {limit:.4} ({} of {} guesses kept)",
            st.accepted,
            st.drafted
        );
    }
}

#[test]
fn a_draft_with_another_tokenizer_is_named() {
    let f = fixtures();
    let a = TextTokenizer::from_dir(&f.join("llama-gqa2-llama3rope")).unwrap();
    let same = TextTokenizer::from_dir(&f.join("mistral-sliding-window")).unwrap();
    assert!(a.difference(&same).is_none());
    let gemma = airllm::hub::default_model().expect("run scripts/fetch_default_model.sh first");
    let b = TextTokenizer::open(&gemma).unwrap();
    let why = a.difference(&b).expect("the two tokenizers differ");
    assert!(why.contains("tokens against"), "{why}");
}

/// The default model (Gemma 3 270M, Q4_K_M): greedy text with n-gram lookup and with a draft
/// is plain greedy text, token for token.
#[test]
fn default_model_greedy_output_is_unchanged_by_guesses() {
    let path = airllm::hub::default_model().expect("run scripts/fetch_default_model.sh first");
    let tok = TextTokenizer::open(&path).unwrap();
    let prompt = tok
        .encode("The rain in Spain stays mainly in the plain. Repeat after me: The rain in Spain")
        .unwrap();
    let n = 48;
    let p = GenerationParams {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let opts = EngineOptions {
        max_memory: Some(2 << 30),
        context: prompt.len() + n + 1,
        max_step_tokens: 128,
        max_logit_rows: 16,
        ..Default::default()
    };
    let mut engine = Engine::open(&path, opts.clone()).unwrap();
    let prompts = [prompt];
    let plain = common::complete(&mut Scheduler::new(), &mut engine, &tok, &prompts, &p);
    for (what, spec) in [
        ("lookup", Speculator::new(DraftSource::Lookup, 10)),
        ("draft", draft(&path, &opts, 10)),
    ] {
        let mut sched = Scheduler::with_speculation(spec);
        let out = common::complete(&mut sched, &mut engine, &tok, &prompts, &p);
        assert_eq!(out[0].token_ids, plain[0].token_ids, "{what}");
        let st = sched.speculation().unwrap().stats;
        assert!(st.accepted > 0, "{what}: {st:?}");
        eprintln!(
            "{what}: {} of {} guesses kept, {:.2} tokens per sweep",
            st.accepted,
            st.drafted,
            st.tokens_per_sweep()
        );
    }
}

//! The scheduler: requests that join, wait, share sweeps and leave at different times each get
//! transformers' greedy tokens, as if run alone.

use crate::common::{self, fixtures, reference};
use airllm::generate::{
    DraftSource, Event, GenerationParams, Request, RequestId, Scheduler, Speculator,
};
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, ModelInfo};

const NAME: &str = "llama-gqa2-llama3rope";

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

/// One tick; the requests that ended go into `done` with their tokens.
fn collect(
    sched: &mut Scheduler,
    engine: &mut Engine,
    tok: &TextTokenizer,
    done: &mut std::collections::HashMap<RequestId, Vec<u32>>,
) {
    for ev in sched.tick(engine, Some(tok)) {
        match ev {
            Event::Done { id, completion, .. } => {
                done.insert(id, completion.token_ids);
            }
            Event::Failed { error, .. } => panic!("a request failed: {error}"),
            Event::Tokens { .. } => {}
        }
    }
}

#[test]
fn requests_join_and_leave_between_sweeps() {
    join_and_leave(false);
}

/// The same with guesses from a draft model of other weights: decode rows carry guesses,
/// beside prefill chunks too, and every request still gets transformers' greedy tokens.
#[test]
fn requests_join_and_leave_while_speculating() {
    join_and_leave(true);
}

fn join_and_leave(speculate: bool) {
    let r = reference(NAME);
    let dir = fixtures().join(NAME);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    // Two sequences at a time, and 5 tokens a sweep: prefill chunks share sweeps with decode
    // rows, and a third request waits for a place.
    let opts = EngineOptions {
        max_memory: Some(1 << 30),
        context: 64,
        max_batch: 2,
        max_step_tokens: 5,
        max_logit_rows: if speculate { 5 } else { 2 },
        ..Default::default()
    };
    let mut engine = Engine::open(&dir, opts.clone()).unwrap();
    let (a, b) = (&r.prompt_ids[0], &r.prompt_ids[1]);
    let mut sched = if speculate {
        let draft = ModelInfo::open(&fixtures().join("mistral-sliding-window")).unwrap();
        let e = airllm::session::open_draft(draft, &opts).unwrap();
        let mut spec = Speculator::new(DraftSource::Model(Box::new(e)), 4);
        spec.min_draft = 1;
        Scheduler::with_speculation(spec)
    } else {
        Scheduler::new()
    };
    let mut done = std::collections::HashMap::new();
    let first = sched.submit(Request::new(a.clone(), greedy(16)));
    for _ in 0..3 {
        collect(&mut sched, &mut engine, &tok, &mut done);
    }
    let second = sched.submit(Request::new(b.clone(), greedy(16)));
    let third = sched.submit(Request::new(b.clone(), greedy(6)));
    let cancelled = sched.submit(Request::new(a.clone(), greedy(16)));
    collect(&mut sched, &mut engine, &tok, &mut done);
    assert_eq!(sched.active(), 2, "two places: the others wait");
    assert_eq!(sched.waiting(), 2);
    sched.cancel(cancelled);
    assert_eq!(sched.waiting(), 1);
    let mut ticks = 0;
    while !sched.is_idle() {
        collect(&mut sched, &mut engine, &tok, &mut done);
        ticks += 1;
        assert!(ticks < 200, "the scheduler does not finish");
    }
    assert_eq!(done[&first], r.greedy[0]);
    assert_eq!(done[&second], r.greedy[1]);
    assert_eq!(done[&third], r.greedy[1][..6]);
    assert!(!done.contains_key(&cancelled));
    if let Some(s) = sched.speculation() {
        assert!(s.stats.drafted > 0, "{:?}", s.stats);
    }
}

#[test]
fn bad_requests_fail_alone() {
    let r = reference(NAME);
    let dir = fixtures().join(NAME);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let mut engine = Engine::open(&dir, common::small_options(32, 2, 16, 2)).unwrap();
    let mut sched = Scheduler::new();
    let long = sched.submit(Request::new(vec![1; 40], greedy(4)));
    let empty = sched.submit(Request::new(vec![], greedy(4)));
    let good = sched.submit(Request::new(r.prompt_ids[1].clone(), greedy(4)));
    let mut failed = Vec::new();
    let mut ok = None;
    while !sched.is_idle() {
        for ev in sched.tick(&mut engine, Some(&tok)) {
            match ev {
                Event::Failed { id, error } => failed.push((id, error.to_string())),
                Event::Done { id, completion, .. } => ok = Some((id, completion.token_ids)),
                Event::Tokens { .. } => {}
            }
        }
    }
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed
        .iter()
        .any(|(id, e)| *id == long && e.contains("context size of 32")));
    assert!(failed
        .iter()
        .any(|(id, e)| *id == empty && e.contains("no tokens")));
    assert_eq!(ok, Some((good, r.greedy[1][..4].to_vec())));
}

//! Generation: the [`Scheduler`] (per-request state, continuous batching over [`Engine::step`]),
//! sampling and stop rules, and [`generate`] for a fixed set of prompts.

pub mod perplexity;
pub mod sampling;
pub mod scheduler;
pub mod speculative;

use crate::engine::{Engine, Sequence};
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
pub use sampling::{argmax, Dist, Sampler, SamplingParams};
pub use scheduler::{Event, Request, RequestId, RequestStats, Scheduler, TokenLogprob};
pub use speculative::{DraftSource, SpecStats, Speculator};

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Keep going past EOS (for benchmarks and reference comparisons).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            ignore_eos: false,
        }
    }
}

impl GenerationParams {
    /// Refuses settings the sampler cannot use, naming the field, before any work starts.
    pub fn check(&self) -> Result<()> {
        let s = &self.sampling;
        let bad = |m: String| Err(Error::Invalid(m));
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return bad(format!(
                "temperature {} must be a number >= 0",
                s.temperature
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", s.top_p));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", s.min_p));
        }
        if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty {} must be a number > 0",
                s.repetition_penalty
            ));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return bad("stop: a stop string must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` or the context size was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt_ids: Vec<u32>,
    /// With [`Request::score_from`]: the log-probability (nats) of each prompt token after it.
    pub prompt_logprobs: Vec<f64>,
    /// Generated ids, without the EOS that ended them.
    pub token_ids: Vec<u32>,
    /// The EOS token that ended them, if one did (transformers' sequences end with it).
    pub eos: Option<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Tracks one sequence's output and decides what text is safe to show: text that could still
/// turn out to be the start of a stop string is held back.
struct Output {
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    eos: Option<u32>,
    text: String,
    shown: usize,
    done: Option<FinishReason>,
    sampler: Sampler,
}

impl Output {
    /// Every token of the sequence so far: the prompt, then the output.
    fn tokens(&self) -> impl Iterator<Item = &u32> {
        self.prompt_ids.iter().chain(&self.ids)
    }

    /// Re-decodes the output and returns the newly safe text.
    fn update(&mut self, tok: &TextTokenizer, stops: &[String]) -> Result<String> {
        let mut text = tok.decode(&self.ids)?;
        if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            self.done = Some(FinishReason::Stop);
        }
        // A trailing replacement character is usually half of a multi-byte character.
        let mut safe = if self.done.is_some() {
            text.len()
        } else {
            text.trim_end_matches('\u{FFFD}').len()
        };
        if self.done.is_none() {
            for s in stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                        safe -= k;
                        break;
                    }
                }
            }
        }
        let piece = if safe > self.shown
            && text.is_char_boundary(safe)
            && text.is_char_boundary(self.shown)
        {
            text[self.shown..safe].to_string()
        } else {
            String::new()
        };
        self.shown = self.shown.max(safe);
        self.text = text;
        Ok(piece)
    }
}

/// Generates for each prompt (token ids) in one batch. `on_text(i, piece)` receives the text of
/// prompt `i` as it becomes final.
pub fn generate(
    engine: &mut Engine,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    generate_on(&mut Scheduler::new(), engine, tok, prompts, params, on_text)
}

/// [`generate`] on a given scheduler (one that speculates, say).
pub fn generate_on(
    sched: &mut Scheduler,
    engine: &mut Engine,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            stream: i as u64,
            ..Request::new(p.clone(), params.clone())
        })
        .collect();
    Ok(run_requests_on(sched, engine, tok, reqs, on_text)?
        .into_iter()
        .map(|(c, _)| c)
        .collect())
}

/// A finished request's caches, to continue its conversation ([`Request::resume`] and
/// [`Request::resume_draft`]).
pub struct Caches {
    pub seq: Sequence,
    pub draft: Option<Sequence>,
}

/// Runs requests to the end on a [`Scheduler`] of their own. `on_text(i, piece)` receives
/// request `i`'s text as it becomes final. Returns each completion with its caches (a chat
/// continues from them); the first request that fails fails the call.
pub fn run_requests(
    engine: &mut Engine,
    tok: &TextTokenizer,
    reqs: Vec<Request>,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<(Completion, Caches)>> {
    run_requests_on(&mut Scheduler::new(), engine, tok, reqs, on_text)
}

/// [`run_requests`] on a given scheduler, which must be idle.
pub fn run_requests_on(
    sched: &mut Scheduler,
    engine: &mut Engine,
    tok: &TextTokenizer,
    reqs: Vec<Request>,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<(Completion, Caches)>> {
    let ids: Vec<RequestId> = reqs.into_iter().map(|r| sched.submit(r)).collect();
    let index = |id: RequestId| ids.iter().position(|&x| x == id).unwrap_or(0);
    let mut done: Vec<Option<(Completion, Caches)>> = ids.iter().map(|_| None).collect();
    while !sched.is_idle() {
        for ev in sched.tick(engine, Some(tok)) {
            match ev {
                Event::Tokens { id, text, .. } if !text.is_empty() => on_text(index(id), &text),
                Event::Tokens { .. } => {}
                Event::Done {
                    id,
                    completion,
                    seq,
                    draft_seq,
                    ..
                } => {
                    let caches = Caches {
                        seq,
                        draft: draft_seq,
                    };
                    done[index(id)] = Some((completion, caches));
                }
                Event::Failed { error, .. } => {
                    // The others stop too: the scheduler is left idle for the next call.
                    for &id in &ids {
                        sched.cancel(id);
                    }
                    return Err(error);
                }
            }
        }
    }
    done.into_iter()
        .map(|d| d.ok_or_else(|| Error::Invalid("internal error: a request never ended".into())))
        .collect()
}

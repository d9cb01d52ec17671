//! Generation: the [`Scheduler`] (per-request state, continuous batching over [`Engine::step`]),
//! sampling and stop rules. [`crate::session::Session`] runs requests on it.

pub mod perplexity;
pub mod sampling;
pub mod scheduler;
pub mod speculative;

use crate::engine::Sequence;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
pub use sampling::{argmax, Dist, Sampler, SamplingParams};
pub use scheduler::{Event, Hook, Request, RequestId, RequestStats, Scheduler, TokenLogprob};
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

/// A finished request's caches, to continue its conversation ([`Request::resume`] and
/// [`Request::resume_draft`]).
pub struct Caches {
    pub seq: Sequence,
    pub draft: Option<Sequence>,
}

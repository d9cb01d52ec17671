//! Speculative decoding: a cheap source guesses the next tokens, and one sweep of the model
//! scores them all. A streamed sweep costs the bytes of every streamed layer whether it carries
//! one row or eight, so each accepted guess is a token for free.
//!
//! - Sources: a small draft model held resident ([`DraftSource::Model`]), or n-gram matches in
//!   the sequence's own tokens ([`DraftSource::Lookup`], "prompt lookup").
//! - Acceptance is speculative sampling (Leviathan et al., 2023): guess `d` drawn from the
//!   draft's distribution `q` is kept with probability `min(1, p(d) / q(d))` under the
//!   model's `p`; the first rejected position draws from `max(0, p - q)` renormalized. The
//!   output is then distributed exactly as the model's. At temperature 0 this is "keep the
//!   guesses the model's argmax agrees with".
//! - Draft length follows the measured acceptance rate and the measured costs of a draft
//!   step and of a sweep by the number of rows it carries ([`Speculator::draft_len`]).
//!
//! The scheduler keeps each request's draft state; this module holds the source, the cost
//! estimates and the arithmetic.

use std::time::Duration;

use super::sampling::{Dist, Sampler};
use crate::engine::{Engine, Sequence};
use crate::error::{Error, Result};

/// Where guesses come from.
pub enum DraftSource {
    /// A smaller model with the same tokenizer, kept resident; each request has a sequence
    /// in it that follows the request's accepted tokens.
    Model(Box<Engine>),
    /// The tokens that followed the latest earlier occurrence of the sequence's last one to
    /// three tokens.
    Lookup,
}

/// Counts over a scheduler's life, for `--profile` and `bench --json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpecStats {
    /// Decode steps of a sequence: each is one row set in one sweep of the model.
    pub seq_sweeps: usize,
    /// Of those, the ones that carried guesses.
    pub rounds: usize,
    /// Tokens guessed, and those the model accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Tokens the decode steps produced (accepted guesses and the model's own tokens).
    pub tokens: usize,
    /// Sweeps of the draft model and the time they took.
    pub draft_sweeps: usize,
    pub draft_time: Duration,
}

impl SpecStats {
    /// Accepted guesses over guesses.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    /// Tokens per decode step of a sequence: 1 without speculation.
    pub fn tokens_per_sweep(&self) -> f64 {
        self.tokens as f64 / self.seq_sweeps.max(1) as f64
    }
}

/// How many rows one decode sweep of the model carries, at most, for a measured cost model.
const MAX_ROWS: usize = 32;

/// A source of guesses with what it has measured.
pub struct Speculator {
    pub source: DraftSource,
    /// The most tokens guessed per sequence and sweep.
    pub max_draft: usize,
    /// The fewest, where room allows, whatever the measurements say (llama.cpp's
    /// `--draft-min`).
    pub min_draft: usize,
    pub stats: SpecStats,
    /// Seconds per sweep of the model by rows carried (decode sweeps only), as running means.
    sweep_cost: [Option<f64>; MAX_ROWS + 1],
    /// Seconds per draft-model sweep, as a running mean.
    draft_cost: Option<f64>,
}

/// Weight of a new measurement in the running means.
const EMA: f64 = 0.2;

impl Speculator {
    pub fn new(source: DraftSource, max_draft: usize) -> Self {
        Speculator {
            source,
            max_draft,
            min_draft: 0,
            stats: SpecStats::default(),
            sweep_cost: [None; MAX_ROWS + 1],
            draft_cost: None,
        }
    }

    /// Records a decode sweep of the model that carried `rows` rows.
    pub(crate) fn sweep_took(&mut self, rows: usize, secs: f64) {
        if let Some(c) = self.sweep_cost.get_mut(rows) {
            *c = Some(c.map_or(secs, |c| c + EMA * (secs - c)));
        }
    }

    pub(crate) fn draft_took(&mut self, secs: f64) {
        self.stats.draft_sweeps += 1;
        self.stats.draft_time += Duration::from_secs_f64(secs);
        self.draft_cost = Some(self.draft_cost.map_or(secs, |c| c + EMA * (secs - c)));
    }

    /// The expected cost of a sweep of `rows` rows: measured where it was, else the nearest
    /// measured count below plus the per-row slope between the two nearest measured counts
    /// (zero while only one count was seen, so longer drafts get tried and measured).
    fn sweep_secs(&self, rows: usize) -> Option<f64> {
        let rows = rows.min(MAX_ROWS);
        if let Some(c) = self.sweep_cost[rows] {
            return Some(c);
        }
        let seen: Vec<(usize, f64)> = self
            .sweep_cost
            .iter()
            .enumerate()
            .filter_map(|(r, c)| c.map(|c| (r, c)))
            .collect();
        let below = seen
            .iter()
            .rev()
            .find(|(r, _)| *r < rows)
            .or(seen.first())?;
        let slope = match seen.len() {
            0 | 1 => 0.0,
            _ => {
                let (a, b) = (seen[seen.len() - 2], seen[seen.len() - 1]);
                ((b.1 - a.1) / (b.0 - a.0) as f64).max(0.0)
            }
        };
        Some(below.1 + slope * (rows as f64 - below.0 as f64))
    }

    /// The guess length with the most expected tokens per second for a sequence whose
    /// guesses are each accepted with probability `alpha` (independently, as the usual
    /// analysis assumes), in a sweep that carries `others` rows besides this sequence's, with
    /// at most `cap` guesses. `k` guesses give (1 - alpha^(k+1)) / (1 - alpha) tokens for
    /// `k` draft steps and one sweep of `others + k + 1` rows.
    pub(crate) fn draft_len(&self, alpha: f64, others: usize, cap: usize) -> usize {
        let cap = cap.min(self.max_draft);
        self.best_len(alpha, others, cap)
            .max(self.min_draft.min(cap))
    }

    fn best_len(&self, alpha: f64, others: usize, cap: usize) -> usize {
        let draft = match self.source {
            DraftSource::Model(_) => self.draft_cost.unwrap_or(0.0),
            DraftSource::Lookup => 0.0,
        };
        let Some(_) = self.sweep_secs(others + 1) else {
            // Nothing measured yet: guess as far as allowed, and measure.
            return cap;
        };
        let alpha = alpha.clamp(0.0, 0.999);
        let mut best = (0, 0.0);
        for k in 0..=cap {
            let tokens = (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha);
            let secs = k as f64 * draft + self.sweep_secs(others + k + 1).unwrap_or(1.0);
            let rate = tokens / secs.max(1e-9);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        best.0
    }
}

/// One request's draft state, kept by the scheduler.
pub(crate) struct DraftState {
    /// The draft model's cache for this request: a prefix of the request's tokens.
    pub seq: Option<Sequence>,
    /// The draft's own random stream (guesses are drawn from the draft's distribution).
    pub sampler: Sampler,
    /// This sweep's guesses and the distributions they were drawn from.
    pub guesses: Vec<u32>,
    pub dists: Vec<Dist>,
    /// Accepted guesses and trials (accepted plus rejections), decayed: the acceptance
    /// estimate is their ratio.
    accepted: f64,
    trials: f64,
    /// Sweeps in a row without guesses; after a run of them one guess is tried again, so a
    /// low estimate can recover.
    idle: usize,
}

impl DraftState {
    pub fn new(seq: Option<Sequence>, sampler: Sampler) -> Self {
        DraftState {
            seq,
            sampler,
            guesses: Vec::new(),
            dists: Vec::new(),
            // A prior of 2 accepted in 3.
            accepted: 2.0,
            trials: 3.0,
            idle: 0,
        }
    }

    pub fn alpha(&self) -> f64 {
        self.accepted / self.trials
    }

    /// Adjusts the chosen length `k` for exploration.
    pub fn explore(&mut self, k: usize, cap: usize) -> usize {
        if k > 0 || cap == 0 {
            self.idle = 0;
            return k;
        }
        self.idle += 1;
        if self.idle >= 16 {
            self.idle = 0;
            return 1;
        }
        0
    }

    /// Records a sweep's outcome: `accepted` of the guesses kept, and whether one was
    /// rejected (the chain stops there).
    pub fn record(&mut self, accepted: usize, rejected: bool) {
        self.accepted += accepted as f64;
        self.trials += accepted as f64 + rejected as u32 as f64;
        if self.trials > 64.0 {
            self.accepted *= 0.5;
            self.trials *= 0.5;
        }
    }
}

/// Up to `k` tokens that followed the latest earlier occurrence of the last `n` tokens of
/// `tokens`, for `n` from 3 down to 1; none without a match.
pub fn lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (1..=3.min(len.saturating_sub(1))).rev() {
        let tail = &tokens[len - n..];
        // Latest first: recent text predicts best.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == tail {
                let from = start + n;
                return tokens[from..(from + k).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}

/// Decides guess `d`, drawn from `q`, under the model's `p`: `Ok(d)` when accepted, else
/// `Err(t)` with the token drawn from the residual `max(0, p - q)`, renormalized. The
/// random numbers come from the request's own sampler.
pub fn verify(p: &Dist, q: &Dist, d: u32, sampler: &mut Sampler) -> std::result::Result<u32, u32> {
    match p {
        // Greedy: the residual of a point mass is the point mass itself.
        Dist::Token(t) => {
            if *t == d {
                Ok(d)
            } else {
                Err(*t)
            }
        }
        Dist::Weighted { ids, probs } => {
            let pd = p.prob(d);
            let qd = q.prob(d).max(f32::MIN_POSITIVE);
            if pd >= qd || sampler.uniform() * qd < pd {
                return Ok(d);
            }
            // q as a dense table: both may span the whole vocabulary, and a lookup per
            // token would be quadratic in it.
            let mut dense = vec![0f32; ids.iter().max().map_or(0, |&m| m as usize + 1)];
            match q {
                Dist::Token(t) => {
                    if let Some(x) = dense.get_mut(*t as usize) {
                        *x = 1.0;
                    }
                }
                Dist::Weighted { ids, probs } => {
                    for (&t, &pt) in ids.iter().zip(probs) {
                        if let Some(x) = dense.get_mut(t as usize) {
                            *x = pt;
                        }
                    }
                }
            }
            let mut rest: Vec<(u32, f32)> = ids
                .iter()
                .zip(probs)
                .map(|(&t, &pt)| (t, (pt - dense[t as usize]).max(0.0)))
                .filter(|&(_, r)| r > 0.0)
                .collect();
            if rest.is_empty() {
                // p and q agree to rounding: p itself is the residual's limit.
                rest = ids.iter().copied().zip(probs.iter().copied()).collect();
            }
            let sum: f32 = rest.iter().map(|r| r.1).sum();
            let residual = Dist::Weighted {
                ids: rest.iter().map(|r| r.0).collect(),
                probs: rest.iter().map(|r| r.1 / sum).collect(),
            };
            Err(sampler.draw(&residual))
        }
    }
}

/// One guess per row for each entry of `reqs`, from the draft model: `(draft sequence, every
/// token of the request so far, guesses wanted, the draft's sampler, the request's
/// sampling history is the token list itself)`. The draft sequence is first fed what it
/// lacks of the tokens (in chunks of the draft's step size), then its own guesses one at a
/// time. Guesses and the distributions they were drawn from go to `out`.
pub(crate) fn draft_model(
    spec: &mut Speculator,
    reqs: &mut [(&mut DraftState, &[u32], usize)],
    vocab: usize,
) -> Result<()> {
    let DraftSource::Model(engine) = &mut spec.source else {
        return Ok(());
    };
    let room_max = engine.options().max_step_tokens.max(1);
    // What each request still has to feed the draft: its missing tokens, then its guesses.
    let mut feed: Vec<Vec<u32>> = reqs
        .iter()
        .map(|(st, toks, _)| {
            let have = st.seq.as_ref().map_or(0, Sequence::len).min(toks.len());
            toks[have..].to_vec()
        })
        .collect();
    for (st, _, _) in reqs.iter_mut() {
        st.guesses.clear();
        st.dists.clear();
    }
    let mut secs = Vec::new();
    loop {
        let mut room = room_max;
        let mut parts: Vec<(usize, usize)> = Vec::new();
        for (i, (st, _, k)) in reqs.iter().enumerate() {
            if st.guesses.len() >= *k || feed[i].is_empty() || room == 0 {
                continue;
            }
            let n = feed[i].len().min(room);
            room -= n;
            parts.push((i, n));
        }
        if parts.is_empty() {
            break;
        }
        let t = std::time::Instant::now();
        let logits = {
            let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(parts.len());
            let mut tails = Vec::with_capacity(parts.len());
            let mut it = parts.iter().peekable();
            for (i, (st, _, _)) in reqs.iter_mut().enumerate() {
                if let Some(&&(j, n)) = it.peek() {
                    if i == j {
                        let seq = st
                            .seq
                            .as_mut()
                            .ok_or_else(|| Error::Internal("no draft sequence".into()))?;
                        batch.push((seq, &feed[i][..n]));
                        tails.push((n == feed[i].len()) as usize);
                        it.next();
                    }
                }
            }
            engine.step_rows(&mut batch, &tails)?
        };
        secs.push(t.elapsed().as_secs_f64());
        let mut logits = logits.into_iter();
        for &(i, n) in &parts {
            let l = logits.next();
            feed[i].drain(..n);
            if !feed[i].is_empty() {
                continue;
            }
            let (st, toks, k) = &mut reqs[i];
            let l = l.ok_or_else(|| Error::Internal("no draft logits".into()))?;
            let mut row: Vec<f32> = l.squeeze(0)?.to_vec1()?;
            // Tokens the model cannot produce are not guessed.
            row.truncate(vocab);
            let history: Vec<u32> = if st.sampler.penalizes() {
                toks.iter().chain(&st.guesses).copied().collect()
            } else {
                Vec::new()
            };
            let dist = st.sampler.distribution(&row, &history);
            let g = st.sampler.draw(&dist);
            st.guesses.push(g);
            st.dists.push(dist);
            if st.guesses.len() < *k {
                feed[i].push(g);
            }
        }
    }
    for s in secs {
        spec.draft_took(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SamplingParams;

    #[test]
    fn lookup_continues_the_latest_match_of_the_longest_suffix() {
        let t = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3];
        // "2 3" last occurred before 7: the latest match wins over the first.
        assert_eq!(lookup(&t, 2), vec![7, 8]);
        assert_eq!(lookup(&t, 9), vec![7, 8, 5, 2, 3]);
        assert!(lookup(&[4, 5, 6], 3).is_empty());
        assert!(lookup(&t, 0).is_empty());
        // A one-token suffix is the last resort.
        assert_eq!(lookup(&[5, 6, 1, 9, 6], 2), vec![1, 9]);
    }

    /// Speculative sampling draws from `p` whatever `q` is: over many trials the frequency
    /// of every token matches `p` (a chi-square test at a false-alarm rate of about 1e-6).
    #[test]
    fn accepting_and_resampling_reproduce_the_target_distribution() {
        let p = Dist::Weighted {
            ids: vec![0, 1, 2, 3, 4],
            probs: vec![0.4, 0.25, 0.2, 0.1, 0.05],
        };
        let drafts = [
            // A draft that disagrees, one that agrees, one with tokens p lacks, and a point mass.
            Dist::Weighted {
                ids: vec![4, 3, 2, 1, 0],
                probs: vec![0.4, 0.25, 0.2, 0.1, 0.05],
            },
            p.clone(),
            Dist::Weighted {
                ids: vec![5, 0, 6],
                probs: vec![0.5, 0.3, 0.2],
            },
            Dist::Token(3),
        ];
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        for (n, q) in drafts.iter().enumerate() {
            let mut target = Sampler::new(params.clone(), n as u64);
            let mut draft = Sampler::new(params.clone(), 100 + n as u64);
            let trials = 200_000;
            let mut count = [0usize; 7];
            for _ in 0..trials {
                let d = draft.draw(q);
                let t = match verify(&p, q, d, &mut target) {
                    Ok(t) | Err(t) => t,
                };
                count[t as usize] += 1;
            }
            assert_eq!(
                count[5] + count[6],
                0,
                "draft {n}: a token p gives no chance"
            );
            let chi2: f64 = (0..5u32)
                .map(|t| {
                    let e = p.prob(t) as f64 * trials as f64;
                    (count[t as usize] as f64 - e).powi(2) / e
                })
                .sum();
            // 4 degrees of freedom: P(chi2 > 33) is about 1e-6.
            assert!(
                chi2 < 33.0,
                "draft {n}: chi-square {chi2:.1}, counts {count:?}"
            );
        }
    }

    #[test]
    fn greedy_verification_keeps_what_the_argmax_agrees_with() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        let q = Dist::Token(7);
        assert_eq!(verify(&Dist::Token(7), &q, 7, &mut s), Ok(7));
        assert_eq!(verify(&Dist::Token(3), &q, 7, &mut s), Err(3));
    }

    #[test]
    fn draft_length_follows_acceptance_and_costs() {
        let mut s = Speculator::new(DraftSource::Lookup, 16);
        // Nothing measured: the cap.
        assert_eq!(s.draft_len(0.5, 0, 7), 7);
        // A sweep costs 1 s plus 10 ms a row: cheap rows, long guesses when they are kept.
        for r in 1..=8 {
            s.sweep_took(r, 1.0 + 0.01 * r as f64);
        }
        assert_eq!(s.draft_len(0.95, 0, 7), 7);
        // Rows that cost as much as the sweep: no guesses unless nearly all are kept.
        let mut s = Speculator::new(DraftSource::Lookup, 16);
        for r in 1..=8 {
            s.sweep_took(r, r as f64);
        }
        assert_eq!(s.draft_len(0.3, 0, 7), 0);
    }
}

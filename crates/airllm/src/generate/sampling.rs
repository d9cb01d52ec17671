//! Choosing the next token: greedy, or sampling with temperature, top-k, top-p and min-p, after
//! a repetition penalty. The order follows transformers' logits processors.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// A seed from the clock, for runs that were given none.
    pub fn clock_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    p: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// `stream` separates the random streams of sequences in one batch, so each prompt's
    /// output depends only on the seed and its position in the batch.
    pub fn new(p: SamplingParams, stream: u64) -> Self {
        let rng = StdRng::seed_from_u64(p.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Sampler { p, rng }
    }

    /// Picks the next token from `logits`, given the tokens seen so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let d = self.distribution(logits, history);
        self.draw(&d)
    }

    /// The distribution the next token is drawn from: the logits after the repetition
    /// penalty, temperature, top-k, top-p and min-p. Speculative decoding compares the
    /// target's and the draft's.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Dist {
        if self.p.temperature <= 0.0 && self.p.repetition_penalty == 1.0 {
            return Dist::Token(argmax(logits)); // greedy: no copy of a 262k-entry row per token
        }
        let mut l = logits.to_vec();
        if self.p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / self.p.repetition_penalty
                    } else {
                        *x * self.p.repetition_penalty
                    };
                }
            }
        }
        if self.p.temperature <= 0.0 {
            return Dist::Token(argmax(&l));
        }
        for x in l.iter_mut() {
            *x /= self.p.temperature;
        }
        // Candidates sorted by logit, best first.
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
        if self.p.top_k > 0 && self.p.top_k < idx.len() {
            // Only the best k need sorting.
            idx.select_nth_unstable_by(self.p.top_k - 1, by_logit);
            idx.truncate(self.p.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = l[idx[0] as usize];
        let mut probs: Vec<f32> = idx.iter().map(|&i| (l[i as usize] - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            idx.truncate(keep);
            probs.truncate(keep);
        }
        if self.p.min_p > 0.0 {
            let floor = probs[0] * self.p.min_p;
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        // Renormalized over what the filters kept.
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        Dist::Weighted { ids: idx, probs }
    }

    /// A token from `d`, with this sampler's random stream.
    pub fn draw(&mut self, d: &Dist) -> u32 {
        match d {
            Dist::Token(t) => *t,
            Dist::Weighted { ids, probs } => match WeightedIndex::new(probs) {
                Ok(w) => ids[w.sample(&mut self.rng)],
                Err(_) => ids[0],
            },
        }
    }

    /// Whether the distribution depends on the history (a repetition penalty).
    pub fn penalizes(&self) -> bool {
        self.p.repetition_penalty != 1.0
    }

    /// A uniform number in [0, 1) from this sampler's random stream.
    pub fn uniform(&mut self) -> f32 {
        use rand::Rng;
        self.rng.random::<f32>()
    }
}

/// What the next token is drawn from.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Certainly this token (greedy decoding).
    Token(u32),
    /// These tokens with these probabilities (summing to 1); the rest have none.
    Weighted { ids: Vec<u32>, probs: Vec<f32> },
}

impl Dist {
    /// The probability of `t`.
    pub fn prob(&self, t: u32) -> f32 {
        match self {
            Dist::Token(x) => (*x == t) as u32 as f32,
            Dist::Weighted { ids, probs } => {
                ids.iter().position(|&x| x == t).map_or(0.0, |i| probs[i])
            }
        }
    }
}

/// log Σ exp(row), in f64 (shifted by the maximum): the softmax's normalizer for
/// log-probabilities.
pub(crate) fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    row.iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

/// Index of the largest logit; the lowest index wins ties, as in torch.argmax.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_penalty() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[]), 1);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.2,
                ..Default::default()
            },
            0,
        );
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[1]), 2);
    }

    #[test]
    fn seeded_runs_repeat_and_filters_restrict() {
        let mut logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        logits[17] = 3.0; // a clear favourite for the nucleus and min-p checks
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), 3);
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        assert_ne!(
            run(&p),
            run(&SamplingParams {
                seed: 8,
                ..p.clone()
            })
        );
        let top2 = run(&SamplingParams {
            top_k: 2,
            ..p.clone()
        });
        let mut best: Vec<u32> = (0..50).collect();
        best.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        assert!(top2.iter().all(|t| best[..2].contains(t)));
        let nucleus = run(&SamplingParams {
            top_p: 0.01,
            ..p.clone()
        });
        assert!(nucleus.iter().all(|&t| t == best[0]));
        let minp = run(&SamplingParams { min_p: 0.999, ..p });
        assert!(minp.iter().all(|&t| t == best[0]));
    }
}

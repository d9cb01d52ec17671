//! Expert look-ahead. A sparse layer's experts are known only once its router has run, so
//! with a cold cache the disk would idle while the last expert of one layer computes and the
//! next layer's attention and router run. While a layer computes, this guesses the next
//! sparse layer's experts by applying that layer's router to this layer's MoE input (the
//! hidden state changes little from one layer to the next; Fate, arXiv 2502.12224, reports
//! about 97% of such guesses right on real models), so the cache can read them early.
//!
//! A wrong guess costs a whole expert's read, a right one saves at most the idle window, so
//! each layer's guesses are scored over a moving window and read ahead only while their
//! precision pays for the misses. Guesses are always made and scored, read or not, so a layer
//! whose routing becomes predictable turns look-ahead back on. On random routing (precision
//! near top-k / experts) nothing is read ahead.

use std::collections::VecDeque;
use std::time::Duration;

use candle_core::{Device, Tensor};

use crate::config::Routing;
use crate::error::Result;
use crate::kernels::matmul::mat_tensor;
use crate::model::block::{route_logits, Routes};
use crate::weights::mat::Mat;
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// Guesses scored per layer: the precision is over this many of the latest.
const WINDOW: usize = 16;
/// Guesses a layer is scored on before its guesses are read.
const MIN_SCORED: usize = 4;
/// The precision a layer needs, whatever the timings say. Break-even in time is at least a
/// half (see [`Lookahead::threshold`]), but every wrong guess is also a read more: at 90%,
/// the waste is at most 11% of the bytes read ahead, and a window of 16 guesses from a layer
/// right two times in three (random weights' small models) rarely reaches it.
const MIN_PRECISION: f64 = 0.9;
/// And the most it is asked for, so that a layer whose window is short still reads ahead
/// when its guesses are nearly all right.
const MAX_PRECISION: f64 = 0.95;

/// A sparse layer's router, copied so that its choice can be guessed before the layer runs.
struct Router {
    w: Mat,
    logit_bias: Option<Tensor>,
    bias: Option<Vec<f32>>,
}

/// An exponential moving average of durations, in seconds.
#[derive(Default, Clone, Copy)]
struct Ema(Option<f64>);

impl Ema {
    fn add(&mut self, d: Duration) {
        let x = d.as_secs_f64();
        self.0 = Some(self.0.map_or(x, |m| 0.8 * m + 0.2 * x));
    }
}

#[derive(Default)]
struct Track {
    /// (guessed, right) of the layer's latest guesses.
    scored: VecDeque<(u32, u32)>,
    /// The guess for the layer's next run.
    open: Option<Vec<usize>>,
}

pub struct Lookahead {
    routing: Routing,
    top_k: usize,
    routers: Vec<Option<Router>>,
    /// The next sparse layer after each layer.
    next: Vec<Option<usize>>,
    tracks: Vec<Track>,
    /// How long an expert's read takes, and the window between a layer's last read of its
    /// own and the next sparse layer's router: what a right guess can hide.
    read: Ema,
    gap: Ema,
}

impl Lookahead {
    /// Copies the routers of the sparse layers of `schemas` from `src`.
    pub fn new(
        src: &dyn WeightSource,
        schemas: &[LayerSchema],
        routing: Routing,
        top_k: usize,
    ) -> Result<Self> {
        let naming = src.naming();
        let routers = schemas
            .iter()
            .enumerate()
            .map(|(l, s)| {
                if !s.is_sparse() {
                    return Ok(None);
                }
                let Some(router) = s.get(Role::Router) else {
                    return Ok(None);
                };
                let small = |role| -> Result<Option<Tensor>> {
                    s.get(role)
                        .map(|t| src.load(&t.name(naming, l), &Device::Cpu))
                        .transpose()
                };
                Ok(Some(Router {
                    w: src.load_mat(&router.name(naming, l))?,
                    logit_bias: small(Role::RouterLogitBias)?,
                    bias: small(Role::RouterBias)?
                        .map(|b| b.flatten_all()?.to_vec1::<f32>())
                        .transpose()?,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let next = (0..schemas.len())
            .map(|l| (l + 1..schemas.len()).find(|&n| routers[n].is_some()))
            .collect();
        Ok(Lookahead {
            routing,
            top_k,
            tracks: (0..schemas.len()).map(|_| Track::default()).collect(),
            routers,
            next,
            read: Ema::default(),
            gap: Ema::default(),
        })
    }

    /// The next sparse layer after `layer`.
    pub fn next(&self, layer: usize) -> Option<usize> {
        self.next.get(layer).copied().flatten()
    }

    /// Scores the open guess for `layer` against the experts it chose: `(guessed, right)`.
    pub fn score(&mut self, layer: usize, chosen: &[usize]) -> Option<(u64, u64)> {
        let t = self.tracks.get_mut(layer)?;
        let guess = t.open.take()?;
        let right = guess.iter().filter(|e| chosen.contains(e)).count();
        if t.scored.len() == WINDOW {
            t.scored.pop_front();
        }
        t.scored.push_back((guess.len() as u32, right as u32));
        Some((guess.len() as u64, right as u64))
    }

    /// Guesses the experts of the sparse layer after `layer` from `layer`'s MoE input: at most
    /// `cap`, the likeliest first (by the router weight the rows give them). Returns the layer,
    /// the guess, and whether it is worth reading.
    pub fn guess(
        &mut self,
        layer: usize,
        input: &Tensor,
        cap: usize,
    ) -> Result<Option<(usize, Vec<usize>, bool)>> {
        let Some(next) = self.next(layer) else {
            return Ok(None);
        };
        let Some(r) = &self.routers[next] else {
            return Ok(None);
        };
        let x = input.to_device(&Device::Cpu)?;
        let routes = route_logits(
            mat_tensor(&x, r.w.view())?,
            r.logit_bias.as_ref(),
            r.bias.as_deref(),
            &self.routing,
            self.top_k,
            false,
        )?;
        let guess = likeliest(&routes, cap);
        self.tracks[next].open = Some(guess.clone());
        Ok(Some((next, guess, self.pays(next))))
    }

    /// An expert's read took `d`.
    pub fn read_took(&mut self, d: Duration) {
        self.read.add(d);
    }

    /// The disk had nothing of a layer's own to read for `d` before the next sparse layer's
    /// router chose.
    pub fn gap(&mut self, d: Duration) {
        self.gap.add(d);
    }

    /// The precision a layer's guesses need to be read: a wrong one costs a read `T`, a right
    /// one saves the window `G` at most (and no more than the read), so reading pays when
    /// `p·min(G, T) > (1 − p)·T`.
    pub fn threshold(&self) -> f64 {
        match (self.read.0, self.gap.0) {
            (Some(t), Some(g)) if t > 0.0 => {
                (t / (t + g.min(t))).clamp(MIN_PRECISION, MAX_PRECISION)
            }
            _ => MIN_PRECISION,
        }
    }

    /// The share of `layer`'s latest guesses that were right, each guess weighed alike (a
    /// prefill's guess of many experts, nearly all right, does not outweigh the decode's).
    pub fn precision(&self, layer: usize) -> Option<f64> {
        let t = self.tracks.get(layer)?;
        let shares: Vec<f64> = t
            .scored
            .iter()
            .filter(|(g, _)| *g > 0)
            .map(|&(g, r)| r as f64 / g as f64)
            .collect();
        (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64)
    }

    /// Whether `layer`'s guesses are read: enough of them scored, right often enough.
    pub fn pays(&self, layer: usize) -> bool {
        self.tracks[layer].scored.len() >= MIN_SCORED
            && self.precision(layer).is_some_and(|p| p >= self.threshold())
    }

    /// Forgets open guesses (after an error, a step's guesses are moot).
    pub fn forget_open(&mut self) {
        for t in &mut self.tracks {
            t.open = None;
        }
    }
}

/// Up to `cap` experts of `routes`, by the router weight their rows give them (the lower
/// index first among equals).
fn likeliest(routes: &Routes, cap: usize) -> Vec<usize> {
    let mut by: Vec<(usize, f32)> = routes
        .iter()
        .map(|(&e, (_, w))| (e, w.iter().sum()))
        .collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    by.into_iter().take(cap).map(|(e, _)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_likeliest_experts_come_first_and_the_cap_holds() {
        let mut routes = Routes::new();
        routes.insert(1, (vec![0], vec![0.2]));
        routes.insert(3, (vec![0, 1], vec![0.5, 0.4]));
        routes.insert(4, (vec![1], vec![0.6]));
        assert_eq!(likeliest(&routes, 8), vec![3, 4, 1]);
        assert_eq!(likeliest(&routes, 2), vec![3, 4]);
    }

    #[test]
    fn the_threshold_weighs_a_read_against_the_window_it_hides() {
        let mut t = Track::default();
        t.scored.push_back((2, 1));
        let mut la = Lookahead {
            routing: Routing::softmax(),
            top_k: 2,
            routers: vec![None],
            next: vec![None],
            tracks: vec![t],
            read: Ema::default(),
            gap: Ema::default(),
        };
        assert_eq!(la.threshold(), MIN_PRECISION);
        // A read as long as nine windows: nine right guesses are needed per wrong one.
        la.read_took(Duration::from_millis(450));
        la.gap(Duration::from_millis(50));
        assert!((la.threshold() - 0.9).abs() < 1e-9);
        // A window longer than the read saves no more than the read.
        la.gap = Ema(Some(1.0));
        assert_eq!(la.threshold(), MIN_PRECISION);
        // Too few scored guesses: not read yet, at any precision.
        la.tracks[0].scored = VecDeque::from(vec![(2, 2); MIN_SCORED - 1]);
        assert!(!la.pays(0));
        la.tracks[0].scored.push_back((2, 2));
        assert!(la.pays(0));
        // Random routing over 8 experts, top-2: a quarter right.
        la.tracks[0].scored = VecDeque::from(vec![(2, 1), (2, 0), (2, 0), (2, 1)]);
        assert_eq!(la.precision(0), Some(0.25));
        assert!(!la.pays(0));
        // A prefill's guess of many experts weighs as one guess.
        la.tracks[0].scored = VecDeque::from(vec![(2, 1); WINDOW - 1]);
        la.tracks[0].scored.push_front((128, 128));
        assert!((la.precision(0).unwrap() - 8.5 / 16.0).abs() < 1e-9);
        assert!(!la.pays(0));
    }

    #[test]
    fn a_guess_is_scored_once_and_the_window_keeps_the_latest() {
        let mut la = Lookahead {
            routing: Routing::softmax(),
            top_k: 2,
            routers: vec![None],
            next: vec![None],
            tracks: vec![Track::default()],
            read: Ema::default(),
            gap: Ema::default(),
        };
        assert_eq!(la.score(0, &[1, 2]), None);
        for _ in 0..WINDOW {
            la.tracks[0].open = Some(vec![0, 1]);
            assert_eq!(la.score(0, &[2, 3]), Some((2, 0)));
        }
        la.tracks[0].open = Some(vec![2, 3]);
        assert_eq!(la.score(0, &[2, 3]), Some((2, 2)));
        assert_eq!(la.score(0, &[2, 3]), None);
        assert_eq!(la.tracks[0].scored.len(), WINDOW);
        assert_eq!(la.precision(0), Some(2.0 / (2.0 * WINDOW as f64)));
    }
}

//! Scaled dot-product attention on the CPU, tiled flash-style: each task takes one KV head and
//! a tile of query rows (with every query head that shares the KV head, so cached keys are
//! read once for the group), and walks the visible keys in tiles with an online softmax. No
//! score matrix larger than a tile exists, no mask tensor is built (causality, the sliding
//! window and soft-capping are applied to each score tile from the positions), and key tiles
//! that no query of the tile can see are skipped. Products are gemm calls on the tiles.

use rayon::prelude::*;

use super::common::{gemm1, Out};

/// Query positions per tile (times the query heads of a group, the rows of one gemm).
const Q_TILE: usize = 32;
/// Keys per tile.
const K_TILE: usize = 256;
/// Chunks of up to this many query rows are attended one row at a time, each exactly as a
/// decode step would (same key range, same tile shapes), so a row's output does not depend
/// on the rows beside it: speculative verification then reproduces plain decoding bit for bit.
pub const ROW_EXACT: usize = 16;

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Values per head read from each value row (of `head_dim` values): `head_dim`, or MLA's
    /// latent rank, whose values are the first columns of its keys.
    pub v_dim: usize,
    pub scale: f32,
    /// Scores become cap·tanh(score/cap) (Gemma 2).
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// One sequence's part of a step.
pub struct Seq<'a> {
    /// Its rows of the packed queries `[rows, heads, head_dim]`: the first and how many.
    pub row: usize,
    pub len: usize,
    /// Absolute position of its first new token.
    pub pos: usize,
    /// Its cached keys and values, `[kv_heads, slots, head_dim]` with `head_stride` values
    /// between heads; `total` slots in use, slot 0 at absolute position `k0`.
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub head_stride: usize,
    pub total: usize,
    pub k0: usize,
}

/// Writes every sequence's attention output into `out` (`[rows, heads · v_dim]`), from the
/// packed queries `q` (`[rows, heads, head_dim]`). `sinks` holds a logit per query head that
/// joins each softmax's denominator and attends to nothing (GPT-OSS).
pub fn attend(shape: Shape, q: &[f32], seqs: &[Seq], sinks: Option<&[f32]>, out: &mut [f32]) {
    let groups = shape.heads / shape.kv_heads;
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            let rows = if seq.len <= ROW_EXACT { 1 } else { Q_TILE };
            (0..shape.kv_heads)
                .flat_map(move |g| (0..seq.len.div_ceil(rows)).map(move |t| (s, g, t * rows)))
        })
        .collect();
    let dst = Out(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(s, g, i0)| {
        let seq = &seqs[s];
        let rows = if seq.len <= ROW_EXACT { 1 } else { Q_TILE };
        let n = rows.min(seq.len - i0);
        tile(shape, groups, q, seq, g, i0, n, sinks, dst);
    });
}

/// Attention of query rows `i0 .. i0 + n` of `seq`, for the query heads of KV head `g`.
#[allow(clippy::too_many_arguments)]
fn tile(
    shape: Shape,
    groups: usize,
    q: &[f32],
    seq: &Seq,
    g: usize,
    i0: usize,
    n: usize,
    sinks: Option<&[f32]>,
    dst: Out,
) {
    let (nh, hd, vd) = (shape.heads, shape.head_dim, shape.v_dim);
    // Row r of the tile is query head g·groups + r / n at query row i0 + r % n.
    let m = groups * n;
    let mut qt = vec![0f32; m * hd];
    for (r, row) in qt.chunks_exact_mut(hd).enumerate() {
        let (h, i) = (g * groups + r / n, seq.row + i0 + r % n);
        row.copy_from_slice(&q[(i * nh + h) * hd..(i * nh + h + 1) * hd]);
    }
    // The keys some row of the tile can see: up to the last row's position, from the first
    // row's window start.
    let (first, last) = (seq.pos + i0, seq.pos + i0 + n - 1);
    let lo_abs = shape.window.map_or(0, |w| (first + 1).saturating_sub(w));
    let lo = lo_abs.saturating_sub(seq.k0);
    let hi = (last + 1 - seq.k0).min(seq.total);
    let k = &seq.k[g * seq.head_stride..];
    let v = &seq.v[g * seq.head_stride..];
    let mut o = vec![0f32; m * vd];
    let mut mx = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0f32; m];
    let mut s = vec![0f32; m * K_TILE];
    let mut j0 = lo;
    while j0 < hi {
        let bk = K_TILE.min(hi - j0);
        // S = Q Kᵀ over this key tile.
        // SAFETY: qt is [m, hd]; keys j0 .. j0 + bk are rows of hd values within k (so Kᵀ's
        // (d, j) is k[(j0 + j)·hd + d]); s has room for [m, bk].
        unsafe {
            gemm1(
                m,
                bk,
                hd,
                s.as_mut_ptr(),
                bk,
                false,
                qt.as_ptr(),
                hd,
                k[j0 * hd..].as_ptr(),
                1,
                hd,
            )
        };
        for r in 0..m {
            let p = seq.pos + i0 + r % n;
            let row = &mut s[r * bk..(r + 1) * bk];
            let mut best = f32::NEG_INFINITY;
            for (j, x) in row.iter_mut().enumerate() {
                let a = seq.k0 + j0 + j;
                let visible = a <= p && shape.window.is_none_or(|w| p - a < w);
                *x = if visible {
                    let t = *x * shape.scale;
                    match shape.softcap {
                        Some(c) => c * (t / c).tanh(),
                        None => t,
                    }
                } else {
                    f32::NEG_INFINITY
                };
                best = best.max(*x);
            }
            if best == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let new = mx[r].max(best);
            let keep = (mx[r] - new).exp();
            let mut add = 0f32;
            for x in row.iter_mut() {
                *x = (*x - new).exp();
                add += *x;
            }
            sum[r] = sum[r] * keep + add;
            mx[r] = new;
            if keep != 1.0 {
                o[r * vd..(r + 1) * vd].iter_mut().for_each(|x| *x *= keep);
            }
        }
        // O += P V over this key tile.
        // SAFETY: s holds [m, bk]; values j0 .. j0 + bk are rows of hd within v, of which the
        // first vd are read; o is [m, vd].
        unsafe {
            gemm1(
                m,
                vd,
                bk,
                o.as_mut_ptr(),
                vd,
                true,
                s.as_ptr(),
                bk,
                v[j0 * hd..].as_ptr(),
                hd,
                1,
            )
        };
        j0 += bk;
    }
    for r in 0..m {
        let (h, i) = (g * groups + r / n, seq.row + i0 + r % n);
        let (keep, total) = match sinks {
            // The sink's term, e^(sink − max) with the max taken over it too.
            Some(z) => {
                let top = mx[r].max(z[h]);
                let keep = (mx[r] - top).exp();
                (keep, sum[r] * keep + (z[h] - top).exp())
            }
            None => (1.0, sum[r]),
        };
        let inv = if total > 0.0 { keep / total } else { 0.0 };
        for d in 0..vd {
            // SAFETY: row i, head h of the output belongs to this task alone (each task has
            // its own KV head's query heads and its own query rows).
            unsafe { *dst.at(i * nh * vd + h * vd + d) = o[r * vd + d] * inv };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention by definition, in f64, for one sequence.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        shape: Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: usize,
        n: usize,
        pos: usize,
        k0: usize,
        total: usize,
        sinks: Option<&[f32]>,
    ) -> Vec<f32> {
        let (nh, hd) = (shape.heads, shape.head_dim);
        let groups = nh / shape.kv_heads;
        let mut out = vec![0f32; n * nh * hd];
        for i in 0..n {
            let p = pos + i;
            for h in 0..nh {
                let g = h / groups;
                let mut sc = vec![f64::NEG_INFINITY; total];
                for (j, slot) in sc.iter_mut().enumerate() {
                    let a = k0 + j;
                    if a <= p && shape.window.is_none_or(|w| p - a < w) {
                        let d: f64 = (0..hd)
                            .map(|d| {
                                q[(i * nh + h) * hd + d] as f64 * k[(g * slots + j) * hd + d] as f64
                            })
                            .sum();
                        let t = d * shape.scale as f64;
                        *slot = match shape.softcap {
                            Some(c) => c as f64 * (t / c as f64).tanh(),
                            None => t,
                        };
                    }
                }
                let sink = sinks.map(|z| z[h] as f64);
                let mx = sc
                    .iter()
                    .cloned()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - mx).exp());
                for d in 0..hd {
                    let o: f64 = (0..total)
                        .map(|j| e[j] / z * v[(g * slots + j) * hd + d] as f64)
                        .sum();
                    out[i * nh * hd + h * hd + d] = o as f32;
                }
            }
        }
        out
    }

    #[test]
    fn tiles_agree_with_the_definition() {
        let val = |i: usize, f: f32| (i as f32 * f).sin() * 2.0;
        // Sinks around the scores' scale, and one far above them (which takes nearly all).
        let sinks = [0.3f32, -1.2, 2.5, 40.0];
        for (window, softcap, n, pos, k0, sink) in [
            (None, None, 1, 300, 0, false),
            (None, None, 70, 0, 0, false),
            (None, Some(50.0), 40, 230, 0, false),
            (Some(100), None, 45, 260, 180, false),
            (Some(7), None, 1, 40, 34, false),
            (None, None, 1, 300, 0, true),
            (Some(4), None, 37, 0, 0, true),
            (Some(100), None, 45, 260, 180, true),
        ] {
            let sinks = sink.then_some(&sinks[..]);
            let shape = Shape {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                v_dim: 16,
                scale: 0.25,
                softcap,
                window,
            };
            let total = pos + n - k0;
            let slots = total + 3;
            let (nh, hd, nkv) = (4, 16, 2);
            let q: Vec<f32> = (0..n * nh * hd).map(|i| val(i, 0.37)).collect();
            let k: Vec<f32> = (0..nkv * slots * hd).map(|i| val(i, 0.11)).collect();
            let v: Vec<f32> = (0..nkv * slots * hd).map(|i| val(i, 0.23)).collect();
            let want = naive(shape, &q, &k, &v, slots, n, pos, k0, total, sinks);
            let mut got = vec![0f32; n * nh * hd];
            let seq = Seq {
                row: 0,
                len: n,
                pos,
                k: &k,
                v: &v,
                head_stride: slots * hd,
                total,
                k0,
            };
            attend(shape, &q, &[seq], sinks, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{window:?} {softcap:?} n={n} sinks {sink}: {a} vs {b}"
                );
            }
        }
    }
}

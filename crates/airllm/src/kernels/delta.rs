//! Gated DeltaNet on the CPU (Qwen3-Next, Qwen3.5): the short causal convolution over q, k and
//! v, and the gated delta rule over a per-head `key_dim × value_dim` state.
//!
//! Two forms of the same recurrence:
//! - [`step_rows`], the recurrent form: one token after another, each a few passes over the
//!   state. Decode and speculative verification use it, so that a row's output never depends
//!   on the rows beside it.
//! - the chunked form ([`forward`] with long steps): within a chunk of [`CHUNK`] tokens the
//!   updates are folded into a unit lower-triangular system (the WY form of DeltaNet), solved
//!   once, and the state is read and written once per chunk through matrix products.
//!
//! The state is S `[dk, dv]` per value head, read as `o = qᵀS` after the update
//! `S ← e^g S + k ⊗ β (v − e^g kᵀS)` (transformers' and FLA's convention).

use super::common::gemm_strided;
use rayon::prelude::*;

/// Tokens per chunk of the chunked form (transformers' and FLA's chunk size).
pub const CHUNK: usize = 64;

/// Steps with more rows than this take the chunked form. Fewer rows go one by one, exactly as
/// decode does, which speculative verification relies on.
pub const RECURRENT_MAX: usize = crate::kernels::attention::ROW_EXACT;

/// The sizes of one linear layer.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub kernel: usize,
}

impl Shape {
    /// Convolution channels: q, k and v side by side.
    pub fn channels(&self) -> usize {
        2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
    }
    pub fn state_len(&self) -> usize {
        self.value_heads * self.key_dim * self.value_dim
    }
    pub fn window_len(&self) -> usize {
        (self.kernel - 1) * self.channels()
    }
}

/// One sequence's state in one linear layer, and what the last step needs to be undone.
pub struct State {
    /// `[value_heads, key_dim, value_dim]`.
    pub s: Vec<f32>,
    /// The convolution's last `kernel - 1` input rows `[kernel - 1, channels]`, oldest first.
    pub window: Vec<f32>,
    /// Tokens the state has seen.
    pub pos: usize,
    /// The state before the last step and that step's inputs, kept for steps of 2 to
    /// `journal_rows` rows (speculative verification's) so that rejected tokens can be taken
    /// back by replaying the accepted ones.
    journal: Option<Journal>,
    journal_rows: usize,
}

struct Journal {
    pos: usize,
    s: Vec<f32>,
    window: Vec<f32>,
    /// The step's inputs: per row the convolution's input and output (q and k normalized),
    /// then g and β per value head.
    rows: Vec<f32>,
}

/// The inputs of one step for one sequence, row-major over its `n` rows.
pub struct StepInput<'a> {
    /// q, k and v before the convolution `[n, channels]`.
    pub qkv: &'a [f32],
    /// The decay's log `g` and the write strength β `[n, value_heads]`.
    pub g: &'a [f32],
    pub beta: &'a [f32],
}

impl State {
    /// A zero state; steps of up to `journal_rows` rows can be taken back.
    pub fn new(shape: &Shape, journal_rows: usize) -> Self {
        State {
            s: vec![0.0; shape.state_len()],
            window: vec![0.0; shape.window_len()],
            pos: 0,
            journal: None,
            journal_rows: journal_rows.min(RECURRENT_MAX),
        }
    }

    /// The most bytes a state of `shape` holds, its journal for `journal_rows` rows included.
    pub fn max_bytes(shape: &Shape, journal_rows: usize) -> u64 {
        let own = shape.state_len() + shape.window_len();
        let rows = journal_rows.min(RECURRENT_MAX);
        let journal = if rows > 1 {
            own + rows * (2 * shape.channels() + 2 * shape.value_heads)
        } else {
            0
        };
        ((own + journal) * 4) as u64
    }

    /// Bytes held: the state, the window, and the journal's copies when one is kept.
    pub fn bytes(&self) -> u64 {
        let j = self
            .journal
            .as_ref()
            .map_or(0, |j| j.s.len() + j.window.len() + j.rows.len());
        ((self.s.len() + self.window.len() + j) * 4) as u64
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.s.fill(0.0);
        self.window.fill(0.0);
        self.pos = 0;
        self.journal = None;
    }

    /// Takes the state back to `len` tokens, where the last step's journal covers it, by
    /// replaying that step's first rows from the state before it. Returns the length kept:
    /// `len`, or 0 (everything forgotten) when the state cannot be rebuilt at `len`.
    pub fn truncate(&mut self, shape: &Shape, len: usize) -> usize {
        if len >= self.pos {
            return self.pos;
        }
        let Some(j) = self.journal.take() else {
            self.reset();
            return 0;
        };
        if len < j.pos {
            self.reset();
            return 0;
        }
        let c = shape.channels();
        let nv = shape.value_heads;
        let per = 2 * c + 2 * nv;
        let keep = len - j.pos;
        let rows: Vec<&[f32]> = j.rows.chunks(per).take(keep).collect();
        // The window: the last kernel − 1 of the old window and the kept inputs.
        let mut ext = j.window.clone();
        rows.iter().for_each(|r| ext.extend_from_slice(&r[..c]));
        let from = ext.len() - self.window.len();
        self.window.copy_from_slice(&ext[from..]);
        self.s.copy_from_slice(&j.s);
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|r| r[c..2 * c].iter().copied())
            .collect();
        let g: Vec<f32> = rows
            .iter()
            .flat_map(|r| r[2 * c..2 * c + nv].iter().copied())
            .collect();
        let b: Vec<f32> = rows
            .iter()
            .flat_map(|r| r[2 * c + nv..].iter().copied())
            .collect();
        let mut out = vec![0.0; keep * nv * shape.value_dim];
        self.delta(shape, &x, &g, &b, keep, &mut out);
        self.pos = len;
        len
    }

    /// Runs `n` new rows through the convolution and the delta rule; `out` `[n, value_heads,
    /// value_dim]` gets the core attention output (before the gated norm). `journal` keeps
    /// what [`Self::truncate`] needs to take rows back.
    fn advance(
        &mut self,
        shape: &Shape,
        conv: &[f32],
        inp: &StepInput,
        n: usize,
        journal: bool,
        out: &mut [f32],
    ) {
        let c = shape.channels();
        let nv = shape.value_heads;
        let old_window = journal.then(|| self.window.clone());
        let mut x = convolve(shape, conv, &mut self.window, inp.qkv, n);
        normalize_qk(shape, &mut x, n);
        match old_window {
            Some(window) => {
                let j = self.journal.get_or_insert_with(|| Journal {
                    pos: 0,
                    s: vec![0.0; self.s.len()],
                    window: Vec::new(),
                    rows: Vec::new(),
                });
                j.pos = self.pos;
                j.s.copy_from_slice(&self.s);
                j.window = window;
                j.rows.clear();
                // Exactly what the plan counts (`max_bytes`), not a doubled capacity.
                j.rows.reserve_exact(n * (2 * c + 2 * nv));
                for t in 0..n {
                    j.rows.extend_from_slice(&inp.qkv[t * c..(t + 1) * c]);
                    j.rows.extend_from_slice(&x[t * c..(t + 1) * c]);
                    j.rows.extend_from_slice(&inp.g[t * nv..(t + 1) * nv]);
                    j.rows.extend_from_slice(&inp.beta[t * nv..(t + 1) * nv]);
                }
            }
            None => self.journal = None,
        }
        self.delta(shape, &x, inp.g, inp.beta, n, out);
        self.pos += n;
    }

    /// The delta rule over `n` rows of convolved, normalized q, k and v `x` `[n, channels]`.
    fn delta(
        &mut self,
        shape: &Shape,
        x: &[f32],
        g: &[f32],
        beta: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let c = shape.channels();
        let nv = shape.value_heads;
        let recurrent = n <= RECURRENT_MAX;
        let (dk, dv) = (shape.key_dim, shape.value_dim);
        let group = nv / shape.key_heads;
        // Each value head owns its state and its columns of the output.
        let mut heads: Vec<Vec<f32>> = vec![Vec::new(); nv];
        self.s
            .par_chunks_mut(dk * dv)
            .zip(heads.par_iter_mut())
            .enumerate()
            .for_each(|(h, (s, o))| {
                let kh = h / group;
                let q = gather(x, c, n, kh * dk, dk);
                let k = gather(x, c, n, (shape.key_heads + kh) * dk, dk);
                let v = gather(x, c, n, 2 * shape.key_heads * dk + h * dv, dv);
                let g: Vec<f32> = (0..n).map(|t| g[t * nv + h]).collect();
                let b: Vec<f32> = (0..n).map(|t| beta[t * nv + h]).collect();
                let rows = HeadRows {
                    q: &q,
                    k: &k,
                    v: &v,
                    g: &g,
                    beta: &b,
                    dk,
                    dv,
                };
                *o = if recurrent {
                    step_rows(s, &rows)
                } else {
                    chunked(s, &rows)
                };
            });
        for (h, o) in heads.iter().enumerate() {
            for t in 0..n {
                out[(t * nv + h) * dv..(t * nv + h + 1) * dv]
                    .copy_from_slice(&o[t * dv..(t + 1) * dv]);
            }
        }
    }
}

/// One step of `n` rows for one sequence: see [`State::advance`]. Short steps keep a journal.
pub fn forward(
    shape: &Shape,
    state: &mut State,
    conv: &[f32],
    inp: &StepInput,
    n: usize,
    out: &mut [f32],
) {
    let journal = n > 1 && n <= state.journal_rows;
    state.advance(shape, conv, inp, n, journal, out);
}

/// The causal depthwise convolution with SiLU over `n` new rows `[n, channels]`, after the
/// `kernel - 1` rows of `window` (which then holds the last of them). `conv` `[channels,
/// kernel]` as transformers stores `conv1d.weight`.
fn convolve(shape: &Shape, conv: &[f32], window: &mut [f32], x: &[f32], n: usize) -> Vec<f32> {
    let c = shape.channels();
    let kern = shape.kernel;
    let past = kern - 1;
    let mut ext = Vec::with_capacity((past + n) * c);
    ext.extend_from_slice(window);
    ext.extend_from_slice(&x[..n * c]);
    let mut y = vec![0.0f32; n * c];
    for t in 0..n {
        let yt = &mut y[t * c..(t + 1) * c];
        for j in 0..kern {
            let row = &ext[(t + j) * c..(t + j + 1) * c];
            for ((yc, &xc), w) in yt.iter_mut().zip(row).zip(conv.chunks_exact(kern)) {
                *yc += w[j] * xc;
            }
        }
        for v in yt.iter_mut() {
            *v = *v / (1.0 + (-*v).exp());
        }
    }
    window.copy_from_slice(&ext[n * c..]);
    y
}

/// L2-normalizes each head of q and k (FLA's eps 1e-6) and scales q by 1/√key_dim.
fn normalize_qk(shape: &Shape, x: &mut [f32], n: usize) {
    let c = shape.channels();
    let dk = shape.key_dim;
    let scale = 1.0 / (dk as f32).sqrt();
    for t in 0..n {
        let row = &mut x[t * c..t * c + 2 * shape.key_heads * dk];
        for (i, head) in row.chunks_exact_mut(dk).enumerate() {
            let ss: f32 = head.iter().map(|v| v * v).sum();
            let mut inv = 1.0 / (ss + 1e-6).sqrt();
            if i < shape.key_heads {
                inv *= scale;
            }
            head.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Columns `[at, at + w)` of `n` rows of width `c`, packed.
fn gather(x: &[f32], c: usize, n: usize, at: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * w);
    for t in 0..n {
        out.extend_from_slice(&x[t * c + at..t * c + at + w]);
    }
    out
}

/// One value head's inputs over `n` rows, each packed: q and k `[n, dk]`, v `[n, dv]`, the
/// log decay g and β `[n]`.
pub struct HeadRows<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub beta: &'a [f32],
    pub dk: usize,
    pub dv: usize,
}

/// The recurrent form for one head over `n` rows: returns `[n, dv]`.
pub fn step_rows(s: &mut [f32], r: &HeadRows) -> Vec<f32> {
    let HeadRows {
        q,
        k,
        v,
        g,
        beta,
        dk,
        dv,
    } = *r;
    let n = g.len();
    let mut out = vec![0.0f32; n * dv];
    let mut mem = vec![0.0f32; dv];
    for t in 0..n {
        let (qt, kt, vt) = (
            &q[t * dk..(t + 1) * dk],
            &k[t * dk..(t + 1) * dk],
            &v[t * dv..(t + 1) * dv],
        );
        let e = g[t].exp();
        // kᵀS of the decayed state, then the correction β(v − kᵀS).
        mem.fill(0.0);
        for (row, &kd) in s.chunks_exact(dv).zip(kt) {
            for (m, &x) in mem.iter_mut().zip(row) {
                *m += kd * x;
            }
        }
        for (m, &x) in mem.iter_mut().zip(vt) {
            *m = (x - e * *m) * beta[t];
        }
        let o = &mut out[t * dv..(t + 1) * dv];
        for ((row, &kd), &qd) in s.chunks_exact_mut(dv).zip(kt).zip(qt) {
            for ((x, &d), o) in row.iter_mut().zip(mem.iter()).zip(o.iter_mut()) {
                *x = e * *x + kd * d;
                *o += qd * *x;
            }
        }
    }
    out
}

/// `d (+)= a · b` for `a`'s element (i, l) at `a[i · a_rs + l · a_cs]` and `b`'s element (l, j)
/// at `b[l · b_rs + j · b_cs]`; `d` `[m, n]` row-major.
#[allow(clippy::too_many_arguments)]
fn mm(
    d: &mut [f64],
    a: &[f64],
    a_rs: usize,
    a_cs: usize,
    b: &[f64],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    n: usize,
    k: usize,
    add: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        if !add {
            d[..m * n].fill(0.0);
        }
        return;
    }
    assert!(d.len() >= m * n);
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above bound every element the product reads and writes, and `d`
    // is a distinct mutable slice.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            d.as_mut_ptr(),
            n,
            add,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
        );
    }
}

/// The chunked form for one head over `n` rows: returns `[n, dv]`. Per chunk of L rows, with
/// G the running sum of g inside the chunk and Γᵢⱼ = e^(Gᵢ − Gⱼ):
/// - T = (I + strict_lower(diag(β) K Kᵀ ⊙ Γ))⁻¹;
/// - U = T diag(β) V and W = T diag(β e^G) K;
/// - V' = U − W S; out = diag(e^G) Q S + (Q Kᵀ ⊙ Γ, causal) V';
/// - S ← e^(G_L) S + (diag(e^(G_L − G)) K)ᵀ V'.
///
/// It computes in f64: the chunk's folded products round differently from the recurrence,
/// and in f32 that moved a hybrid model's logits by up to 3e-4 from an exact reference
/// (where the recurrent form stays within 1e-4); the state's products are a small part of a
/// layer's work.
fn chunked(s32: &mut [f32], r: &HeadRows) -> Vec<f32> {
    let (dk, dv, g, n) = (r.dk, r.dv, r.g, r.g.len());
    let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
    let (q, k, v, beta) = (wide(r.q), wide(r.k), wide(r.v), wide(r.beta));
    let mut s = wide(s32);
    let mut out = vec![0.0f64; n * dv];
    let mut kk = vec![0.0f64; CHUNK * CHUNK];
    let mut t_inv = vec![0.0f64; CHUNK * CHUNK];
    let mut rhs_v = vec![0.0f64; CHUNK * dv];
    let mut rhs_k = vec![0.0f64; CHUNK * dk];
    let mut u = vec![0.0f64; CHUNK * dv];
    let mut w = vec![0.0f64; CHUNK * dk];
    let mut qs = vec![0.0f64; CHUNK * dk];
    let mut kd = vec![0.0f64; CHUNK * dk];
    let mut gc = [0.0f64; CHUNK];
    let mut t0 = 0;
    while t0 < n {
        let l = CHUNK.min(n - t0);
        let (qc, kc, vc) = (
            &q[t0 * dk..(t0 + l) * dk],
            &k[t0 * dk..(t0 + l) * dk],
            &v[t0 * dv..(t0 + l) * dv],
        );
        let bc = &beta[t0..t0 + l];
        let mut acc = 0.0f64;
        for i in 0..l {
            acc += g[t0 + i] as f64;
            gc[i] = acc;
        }
        // K Kᵀ, then the strictly lower system and its inverse by forward substitution.
        mm(&mut kk, kc, dk, 1, kc, 1, dk, l, l, dk, false);
        t_inv[..l * l].fill(0.0);
        for i in 0..l {
            t_inv[i * l + i] = 1.0;
            for j in 0..i {
                let a = bc[i] * kk[i * l + j] * (gc[i] - gc[j]).exp();
                if a != 0.0 {
                    let (done, row) = t_inv.split_at_mut(i * l);
                    let tj = &done[j * l..j * l + l];
                    for (x, &y) in row[..l].iter_mut().zip(tj) {
                        *x -= a * y;
                    }
                }
            }
        }
        scale_rows(&mut rhs_v, vc, dv, l, |i| bc[i]);
        scale_rows(&mut rhs_k, kc, dk, l, |i| bc[i] * gc[i].exp());
        mm(&mut u, &t_inv, l, 1, &rhs_v, dv, 1, l, dv, l, false);
        mm(&mut w, &t_inv, l, 1, &rhs_k, dk, 1, l, dk, l, false);
        // V' = U − W S (into u).
        for x in w[..l * dk].iter_mut() {
            *x = -*x;
        }
        mm(&mut u, &w, dk, 1, &s, dv, 1, l, dv, dk, true);
        // out = diag(e^G) Q S + causal(Q Kᵀ ⊙ Γ) V'.
        scale_rows(&mut qs, qc, dk, l, |i| gc[i].exp());
        let oc = &mut out[t0 * dv..(t0 + l) * dv];
        mm(oc, &qs, dk, 1, &s, dv, 1, l, dv, dk, false);
        mm(&mut kk, qc, dk, 1, kc, 1, dk, l, l, dk, false);
        for i in 0..l {
            for j in 0..l {
                let x = &mut kk[i * l + j];
                *x = if j <= i {
                    *x * (gc[i] - gc[j]).exp()
                } else {
                    0.0
                };
            }
        }
        mm(oc, &kk, l, 1, &u, dv, 1, l, dv, l, true);
        // S ← e^(G_L) S + (diag(e^(G_L − G)) K)ᵀ V'.
        let last = gc[l - 1];
        scale_rows(&mut kd, kc, dk, l, |i| (last - gc[i]).exp());
        let el = last.exp();
        s.iter_mut().for_each(|x| *x *= el);
        // (kd)ᵀ is [dk, l]: element (d, i) at kd[i·dk + d].
        mm(&mut s, &kd, 1, dk, &u, dv, 1, dk, dv, l, true);
        t0 += l;
    }
    s32.iter_mut().zip(&s).for_each(|(x, &y)| *x = y as f32);
    out.iter().map(|&x| x as f32).collect()
}

/// Row i of `dst` is row i of `src` times `f(i)`, for `l` rows of width `w`.
fn scale_rows(dst: &mut [f64], src: &[f64], w: usize, l: usize, f: impl Fn(usize) -> f64) {
    for (i, (x, y)) in dst
        .chunks_exact_mut(w)
        .zip(src.chunks_exact(w))
        .take(l)
        .enumerate()
    {
        let e = f(i);
        x.iter_mut().zip(y).for_each(|(x, &y)| *x = e * y);
    }
}

/// The gated RMSNorm on each value head's output: `rmsnorm(o) · w · silu(z)`, in place over
/// rows of `[heads, dv]`.
pub fn gated_norm(o: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    let dv = w.len();
    o.par_chunks_mut(dv)
        .zip(z.par_chunks(dv))
        .for_each(|(o, z)| {
            let ms = o.iter().map(|x| x * x).sum::<f32>() / dv as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((x, &zw), &wv) in o.iter_mut().zip(z).zip(w) {
                *x = *x * r * wv * (zw / (1.0 + (-zw).exp()));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn the_chunked_form_gives_the_recurrent_forms_numbers() {
        let (dk, dv) = (16, 8);
        let mut seed = 7;
        for n in [1, 5, 64, 100, 150] {
            let q = rand(n * dk, &mut seed);
            let mut k = rand(n * dk, &mut seed);
            // Unit keys, as the layer's L2 norm makes them.
            for row in k.chunks_mut(dk) {
                let r = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x /= r);
            }
            let v = rand(n * dv, &mut seed);
            let g: Vec<f32> = rand(n, &mut seed).iter().map(|x| -(x + 0.5)).collect();
            let b: Vec<f32> = rand(n, &mut seed).iter().map(|x| x + 0.5).collect();
            let s0 = rand(dk * dv, &mut seed);
            let (mut s1, mut s2) = (s0.clone(), s0.clone());
            let rows = HeadRows {
                q: &q,
                k: &k,
                v: &v,
                g: &g,
                beta: &b,
                dk,
                dv,
            };
            let a = step_rows(&mut s1, &rows);
            let c = chunked(&mut s2, &rows);
            let worst = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max)
            };
            assert!(
                worst(&a, &c) < 1e-5,
                "n {n}: outputs differ by {}",
                worst(&a, &c)
            );
            assert!(
                worst(&s1, &s2) < 1e-5,
                "n {n}: states differ by {}",
                worst(&s1, &s2)
            );
        }
    }

    #[test]
    fn a_short_step_is_taken_back_by_replaying_the_kept_rows() {
        let shape = Shape {
            key_heads: 1,
            value_heads: 2,
            key_dim: 8,
            value_dim: 4,
            kernel: 4,
        };
        let c = shape.channels();
        let nv = shape.value_heads;
        let mut seed = 3;
        let conv = rand(c * shape.kernel, &mut seed);
        let qkv = rand(6 * c, &mut seed);
        let g: Vec<f32> = rand(6 * nv, &mut seed).iter().map(|x| x - 0.5).collect();
        let beta: Vec<f32> = rand(6 * nv, &mut seed).iter().map(|x| x + 0.5).collect();
        let step = |st: &mut State, from: usize, n: usize| {
            let mut out = vec![0.0; n * nv * shape.value_dim];
            let inp = StepInput {
                qkv: &qkv[from * c..(from + n) * c],
                g: &g[from * nv..(from + n) * nv],
                beta: &beta[from * nv..(from + n) * nv],
            };
            forward(&shape, st, &conv, &inp, n, &mut out);
            out
        };
        // Plain: two rows, then one by one.
        let mut plain = State::new(&shape, 0);
        step(&mut plain, 0, 2);
        step(&mut plain, 2, 1);
        let want = step(&mut plain, 3, 1);
        // Speculative: two rows, then four guessed of which one is kept.
        let mut spec = State::new(&shape, 8);
        step(&mut spec, 0, 2);
        step(&mut spec, 2, 4);
        assert_eq!(spec.truncate(&shape, 3), 3);
        let got = step(&mut spec, 3, 1);
        assert_eq!(got, want);
        assert_eq!(spec.s, plain.s);
        // Before the journal: everything is forgotten.
        assert_eq!(spec.truncate(&shape, 1), 0);
        assert_eq!(spec.pos, 0);
    }
}

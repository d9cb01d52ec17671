//! Many activation rows times Q4_K or Q6_K weights in integers, with AVX-512 VNNI: the prefill
//! path for the K-quants of llama.cpp's Q4_K_M mix when the CPU has `vpdpbusd`.
//!
//! The dequantize-and-gemm path widens every weight to f32 and multiplies in f32 FMAs (32
//! products a cycle). Here the weights stay 4-bit values, widened to bytes, and `vpdpbusd`
//! multiplies unsigned weight bytes by the activations' signed Q8_K bytes, 64 products an
//! instruction. The arithmetic is llama.cpp's `q4_K × q8_K` and `q6_K × q8_K` dot products:
//! each run (32 values for Q4_K, 16 for Q6_K) sums in integers, the runs' scales multiply in
//! integers, and each 256-value block scales once in f32. Q4_K's minimums go through the
//! activation runs' sums; Q6_K's values are stored unsigned (0..63) and its offset of 32 comes
//! off through the Q8_K block's sums of 16, in integers, as llama.cpp does.
//!
//! Layout: a task packs 32 weight rows (a tile) so that 4 consecutive values of 16 rows fill a
//! register (`[quad][row][4]`), with the rows' scales, minimums and block scales beside them;
//! the activations are read as they are, each 4-byte quad broadcast from memory.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::common::{q4k_scale_min, Out};

/// Weight rows per packed tile: two registers of 16 lanes.
const TILE: usize = 32;
/// Activation rows computed together (their accumulators stay in registers).
const XR: usize = 4;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
const Q8K_BYTES: usize = 292;

/// The weight types the kernel takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4K,
    Q6K,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K => Q4K_BYTES,
            Kind::Q6K => Q6K_BYTES,
        }
    }
    /// Runs (values sharing a scale) per 256-value block.
    fn runs(self) -> usize {
        match self {
            Kind::Q4K => 8,
            Kind::Q6K => 16,
        }
    }
}

/// Whether this CPU runs the kernel (`AIRLLM_PORTABLE_KERNEL` turns it off, as it does ours).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("AIRLLM_PORTABLE_KERNEL").is_none()
            && std::env::var_os("AIRLLM_NO_VNNI").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// One tile's weights, packed for the kernel. Rows past the matrix are zeros.
#[derive(Default)]
struct Packed {
    /// `[block][64 quads][TILE rows][4]` weight values 0..=15.
    q: Vec<u8>,
    /// `[block][run][TILE]` run scales (Q4_K: 6-bit; Q6_K: signed 8-bit).
    sc: Vec<i32>,
    /// `[block][8 runs][TILE]` Q4_K's 6-bit run minimums, as floats.
    m: Vec<f32>,
    /// `[block][TILE]` block scales `d` and (Q4_K) `dmin`.
    d: Vec<f32>,
    dmin: Vec<f32>,
}

impl Packed {
    /// Packs weight rows `r0 .. r0 + rows` (`rows <= TILE`) of `w` (`kb` blocks a row).
    fn pack(&mut self, kind: Kind, w: &[u8], kb: usize, r0: usize, rows: usize) {
        self.q.clear();
        self.q.resize(kb * 64 * TILE * 4, 0);
        self.sc.clear();
        self.sc.resize(kb * kind.runs() * TILE, 0);
        self.m.clear();
        self.m.resize(kb * 8 * TILE, 0.0);
        self.d.clear();
        self.d.resize(kb * TILE, 0.0);
        self.dmin.clear();
        self.dmin.resize(kb * TILE, 0.0);
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        if kind == Kind::Q6K {
            self.pack_q6k(w, kb, r0, rows);
            return;
        }
        for r in 0..rows {
            let row = &w[(r0 + r) * kb * Q4K_BYTES..(r0 + r + 1) * kb * Q4K_BYTES];
            for (b, blk) in row.chunks_exact(Q4K_BYTES).enumerate() {
                self.d[b * TILE + r] = f16(&blk[0..2]);
                self.dmin[b * TILE + r] = f16(&blk[2..4]);
                for j in 0..8 {
                    let (sc, m) = q4k_scale_min(&blk[4..16], j);
                    self.sc[(b * 8 + j) * TILE + r] = sc as i32;
                    self.m[(b * 8 + j) * TILE + r] = m as f32;
                }
                let qs = &blk[16..];
                // Run j's value i: byte 32·(j/2) + i of qs, low nibble for even j.
                let mut v = [0u8; 256];
                for (j, run) in v.chunks_exact_mut(32).enumerate() {
                    let (src, shift) = (&qs[32 * (j / 2)..][..32], 4 * (j % 2));
                    for (d, &s) in run.iter_mut().zip(src) {
                        *d = (s >> shift) & 0x0f;
                    }
                }
                self.scatter(b, r, &v);
            }
        }
    }
}

impl Packed {
    /// Writes a block's 256 values of tile row `r` as 64 quads, each beside the other rows'.
    fn scatter(&mut self, b: usize, r: usize, v: &[u8; 256]) {
        let q = &mut self.q[b * 64 * TILE * 4..(b + 1) * 64 * TILE * 4];
        for (t, quad) in v.chunks_exact(4).enumerate() {
            q[(t * TILE + r) * 4..][..4].copy_from_slice(quad);
        }
    }

    /// Q6_K blocks (210 bytes) are `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
    /// Value `v` of half `h = v / 128` is, with `g = (v % 128) / 32` and `l = v % 32`, the low
    /// or high nibble (g ≥ 2) of `ql[64h + l + 32·(g % 2)]` with bits `2g..2g+2` of
    /// `qh[32h + l]` above it; run `v / 16` takes `scales[v / 16]`.
    fn pack_q6k(&mut self, w: &[u8], kb: usize, r0: usize, rows: usize) {
        for r in 0..rows {
            let row = &w[(r0 + r) * kb * Q6K_BYTES..(r0 + r + 1) * kb * Q6K_BYTES];
            for (b, blk) in row.chunks_exact(Q6K_BYTES).enumerate() {
                let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
                self.d[b * TILE + r] = half::f16::from_le_bytes([blk[208], blk[209]]).to_f32();
                for (j, &sc) in scales.iter().enumerate() {
                    self.sc[(b * 16 + j) * TILE + r] = sc as i8 as i32;
                }
                // 32 values at a time, from 32 bytes of ql and 32 of qh.
                let mut v = [0u8; 256];
                for (k, out) in v.chunks_exact_mut(32).enumerate() {
                    let (h, g) = (k / 4, k % 4);
                    let lo = &ql[64 * h + 32 * (g % 2)..][..32];
                    let hi = &qh[32 * h..][..32];
                    let (lo_shift, hi_shift) = (4 * (g / 2), 2 * g);
                    for ((d, &l), &hb) in out.iter_mut().zip(lo).zip(hi) {
                        *d = ((l >> lo_shift) & 0x0f) | (((hb >> hi_shift) & 3) << 4);
                    }
                }
                self.scatter(b, r, &v);
            }
        }
    }
}

thread_local! {
    static PACKED: std::cell::RefCell<Packed> = std::cell::RefCell::new(Packed::default());
}

/// `y[i, col0 + j] = x_i · w_j` for `m` activation rows `xq` (Q8_K, `kb` blocks a row, with
/// their `aux` for Q4_K: per block the scale and the eight run sums) and `n` weight rows `w` of
/// `kind`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    kind: Kind,
    xq: &[u8],
    aux: &[f32],
    m: usize,
    w: &[u8],
    n: usize,
    kb: usize,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
) {
    debug_assert!(available());
    debug_assert!(xq.len() >= m * kb * Q8K_BYTES);
    debug_assert!(kind == Kind::Q6K || aux.len() >= m * kb * 9);
    debug_assert!(w.len() >= n * kb * kind.block_bytes());
    debug_assert!(y.len() >= m * ldy && col0 + n <= ldy);
    let out = Out(y.as_mut_ptr());
    (0..n.div_ceil(TILE)).into_par_iter().for_each(|t| {
        let r0 = t * TILE;
        let rows = (n - r0).min(TILE);
        PACKED.with(|p| {
            let mut p = p.borrow_mut();
            p.pack(kind, w, kb, r0, rows);
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(XR);
                let at = |c: usize| (i + c.min(nx - 1)) * kb;
                let xs: [*const u8; XR] = std::array::from_fn(|c| xq[at(c) * Q8K_BYTES..].as_ptr());
                let ax: [*const f32; XR] = std::array::from_fn(|c| {
                    aux.get(at(c) * 9..)
                        .map_or(std::ptr::null(), |a| a.as_ptr())
                });
                let mut res = [[0f32; TILE]; XR];
                // SAFETY: the CPU has AVX-512 F/BW/VNNI (`available`); `xs` and `ax` point at
                // kb whole blocks of rows within `xq` and `aux`, and the tile holds kb blocks.
                unsafe {
                    match kind {
                        Kind::Q4K => tile::<false>(&p, kb, &xs, &ax, &mut res),
                        Kind::Q6K => tile::<true>(&p, kb, &xs, &ax, &mut res),
                    }
                };
                for (c, r) in res.iter().enumerate().take(nx) {
                    for (j, v) in r.iter().enumerate().take(rows) {
                        // SAFETY: row i + c < m and column col0 + r0 + j < col0 + n <= ldy;
                        // the column belongs to this task alone.
                        unsafe { *out.at((i + c) * ldy + col0 + r0 + j) = *v };
                    }
                }
                i += nx;
            }
        });
    });
}

/// The products of a packed tile with `XR` activation rows (extra rows repeat the last).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const Q6: bool>(
    p: &Packed,
    kb: usize,
    xs: &[*const u8; XR],
    ax: &[*const f32; XR],
    res: &mut [[f32; TILE]; XR],
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; XR];
    for b in 0..kb {
        let q = p.q.as_ptr().add(b * 64 * TILE * 4);
        let mut blk = [[_mm512_setzero_si512(); 2]; XR];
        let (runs, quads) = if Q6 { (16, 4) } else { (8, 8) };
        for j in 0..runs {
            let mut run = [[_mm512_setzero_si512(); 2]; XR];
            for t in 0..quads {
                let wq = q.add((j * quads + t) * TILE * 4);
                let w0 = _mm512_loadu_si512(wq as *const _);
                let w1 = _mm512_loadu_si512(wq.add(64) as *const _);
                for c in 0..XR {
                    let xq = xs[c].add(b * Q8K_BYTES + 4 + 4 * (j * quads + t));
                    let xb = _mm512_set1_epi32((xq as *const i32).read_unaligned());
                    run[c][0] = _mm512_dpbusd_epi32(run[c][0], w0, xb);
                    run[c][1] = _mm512_dpbusd_epi32(run[c][1], w1, xb);
                }
            }
            let sc = p.sc.as_ptr().add((b * runs + j) * TILE);
            let s0 = _mm512_loadu_si512(sc as *const _);
            let s1 = _mm512_loadu_si512(sc.add(16) as *const _);
            for c in 0..XR {
                if Q6 {
                    // The stored values are q + 32: take 32 times the activations' run sum off.
                    let bs =
                        (xs[c].add(b * Q8K_BYTES + 260 + 2 * j) as *const i16).read_unaligned();
                    let off = _mm512_set1_epi32(32 * bs as i32);
                    run[c][0] = _mm512_sub_epi32(run[c][0], off);
                    run[c][1] = _mm512_sub_epi32(run[c][1], off);
                }
                blk[c][0] = _mm512_add_epi32(blk[c][0], _mm512_mullo_epi32(run[c][0], s0));
                blk[c][1] = _mm512_add_epi32(blk[c][1], _mm512_mullo_epi32(run[c][1], s1));
            }
        }
        let d = p.d.as_ptr().add(b * TILE);
        let (d0, d1) = (_mm512_loadu_ps(d), _mm512_loadu_ps(d.add(16)));
        if Q6 {
            for c in 0..XR {
                let dx = _mm512_set1_ps((xs[c].add(b * Q8K_BYTES) as *const f32).read_unaligned());
                for (h, dv) in [d0, d1].into_iter().enumerate() {
                    let sum = _mm512_cvtepi32_ps(blk[c][h]);
                    acc[c][h] = _mm512_fmadd_ps(_mm512_mul_ps(dv, dx), sum, acc[c][h]);
                }
            }
            continue;
        }
        let dm = p.dmin.as_ptr().add(b * TILE);
        let (m0, m1) = (_mm512_loadu_ps(dm), _mm512_loadu_ps(dm.add(16)));
        for c in 0..XR {
            let a = ax[c].add(b * 9);
            let dx = _mm512_set1_ps(*a);
            // The minimums: Σ_j m_j · (sum of the activations' run j), exact in f32.
            let mut s = [_mm512_setzero_ps(); 2];
            for j in 0..8 {
                let mv = p.m.as_ptr().add((b * 8 + j) * TILE);
                let bs = _mm512_set1_ps(*a.add(1 + j));
                s[0] = _mm512_fmadd_ps(_mm512_loadu_ps(mv), bs, s[0]);
                s[1] = _mm512_fmadd_ps(_mm512_loadu_ps(mv.add(16)), bs, s[1]);
            }
            for (h, (dv, mv)) in [(d0, m0), (d1, m1)].into_iter().enumerate() {
                let sum = _mm512_cvtepi32_ps(blk[c][h]);
                let v = _mm512_fmadd_ps(_mm512_mul_ps(dv, dx), sum, acc[c][h]);
                acc[c][h] = _mm512_fnmadd_ps(_mm512_mul_ps(mv, dx), s[h], v);
            }
        }
    }
    for c in 0..XR {
        _mm512_storeu_ps(res[c].as_mut_ptr(), acc[c][0]);
        _mm512_storeu_ps(res[c].as_mut_ptr().add(16), acc[c][1]);
    }
}

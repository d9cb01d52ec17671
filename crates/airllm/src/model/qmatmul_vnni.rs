//! Many activation rows times Q4_K weights in integers, with AVX-512 VNNI: the prefill path for
//! the most common quantized type when the CPU has `vpdpbusd`.
//!
//! The dequantize-and-gemm path widens every weight to f32 and multiplies in f32 FMAs (32
//! products a cycle). Here the weights stay 4-bit values, widened to bytes, and `vpdpbusd`
//! multiplies unsigned weight bytes by the activations' signed Q8_K bytes, 64 products an
//! instruction. The arithmetic is llama.cpp's `q4_K × q8_K` dot product: each run of 32 values
//! sums in integers, the runs' 6-bit scales multiply in integers, and each 256-value block
//! scales once in f32 (the minimums through the activation runs' sums).
//!
//! Layout: a task packs 32 weight rows (a tile) so that 4 consecutive values of 16 rows fill a
//! register (`[quad][row][4]`), with the rows' scales, minimums and block scales beside them;
//! the activations are read as they are, each 4-byte quad broadcast from memory.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::matmul::Out;

/// Weight rows per packed tile: two registers of 16 lanes.
const TILE: usize = 32;
/// Activation rows computed together (their accumulators stay in registers).
const XR: usize = 4;
const Q4K_BYTES: usize = 144;
const Q8K_BYTES: usize = 292;

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
    /// `[block][8 runs][TILE]` 6-bit run scales.
    sc: Vec<i32>,
    /// `[block][8 runs][TILE]` 6-bit run minimums, as floats.
    m: Vec<f32>,
    /// `[block][TILE]` block scales `d` and `dmin`.
    d: Vec<f32>,
    dmin: Vec<f32>,
}

/// The 6-bit scale and minimum of run `j` from a Q4_K block's 12 packed bytes.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

impl Packed {
    /// Packs weight rows `r0 .. r0 + rows` (`rows <= TILE`) of `w` (`kb` blocks a row).
    fn pack(&mut self, w: &[u8], kb: usize, r0: usize, rows: usize) {
        self.q.clear();
        self.q.resize(kb * 64 * TILE * 4, 0);
        self.sc.clear();
        self.sc.resize(kb * 8 * TILE, 0);
        self.m.clear();
        self.m.resize(kb * 8 * TILE, 0.0);
        self.d.clear();
        self.d.resize(kb * TILE, 0.0);
        self.dmin.clear();
        self.dmin.resize(kb * TILE, 0.0);
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for r in 0..rows {
            let row = &w[(r0 + r) * kb * Q4K_BYTES..(r0 + r + 1) * kb * Q4K_BYTES];
            for (b, blk) in row.chunks_exact(Q4K_BYTES).enumerate() {
                self.d[b * TILE + r] = f16(&blk[0..2]);
                self.dmin[b * TILE + r] = f16(&blk[2..4]);
                for j in 0..8 {
                    let (sc, m) = scale_min(&blk[4..16], j);
                    self.sc[(b * 8 + j) * TILE + r] = sc as i32;
                    self.m[(b * 8 + j) * TILE + r] = m as f32;
                }
                let qs = &blk[16..];
                let q = &mut self.q[b * 64 * TILE * 4..(b + 1) * 64 * TILE * 4];
                // Run j's value i: byte 32·(j/2) + i of qs, low nibble for even j.
                for j in 0..8 {
                    let (base, shift) = (32 * (j / 2), 4 * (j % 2));
                    for t in 0..8 {
                        let dst = &mut q[((j * 8 + t) * TILE + r) * 4..][..4];
                        for (e, v) in dst.iter_mut().enumerate() {
                            *v = (qs[base + 4 * t + e] >> shift) & 0x0f;
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    static PACKED: std::cell::RefCell<Packed> = std::cell::RefCell::new(Packed::default());
}

/// `y[i, col0 + j] = x_i · w_j` for `m` activation rows `xq` (Q8_K, `kb` blocks a row, with
/// their `aux`: per block the scale and the eight run sums) and `n` Q4_K weight rows `w`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
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
    debug_assert!(xq.len() >= m * kb * Q8K_BYTES && aux.len() >= m * kb * 9);
    debug_assert!(w.len() >= n * kb * Q4K_BYTES && y.len() >= m * ldy && col0 + n <= ldy);
    let out = Out(y.as_mut_ptr());
    (0..n.div_ceil(TILE)).into_par_iter().for_each(|t| {
        let r0 = t * TILE;
        let rows = (n - r0).min(TILE);
        PACKED.with(|p| {
            let mut p = p.borrow_mut();
            p.pack(w, kb, r0, rows);
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(XR);
                let at = |c: usize| (i + c.min(nx - 1)) * kb;
                let xs: [*const u8; XR] = std::array::from_fn(|c| xq[at(c) * Q8K_BYTES..].as_ptr());
                let ax: [*const f32; XR] = std::array::from_fn(|c| aux[at(c) * 9..].as_ptr());
                let mut res = [[0f32; TILE]; XR];
                // SAFETY: the CPU has AVX-512 F/BW/VNNI (`available`); `xs` and `ax` point at
                // kb whole blocks of rows within `xq` and `aux`, and the tile holds kb blocks.
                unsafe { tile(&p, kb, &xs, &ax, &mut res) };
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
unsafe fn tile(
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
        for j in 0..8 {
            let mut run = [[_mm512_setzero_si512(); 2]; XR];
            for t in 0..8 {
                let wq = q.add((j * 8 + t) * TILE * 4);
                let w0 = _mm512_loadu_si512(wq as *const _);
                let w1 = _mm512_loadu_si512(wq.add(64) as *const _);
                for c in 0..XR {
                    let xq = xs[c].add(b * Q8K_BYTES + 4 + 32 * j + 4 * t);
                    let xb = _mm512_set1_epi32((xq as *const i32).read_unaligned());
                    run[c][0] = _mm512_dpbusd_epi32(run[c][0], w0, xb);
                    run[c][1] = _mm512_dpbusd_epi32(run[c][1], w1, xb);
                }
            }
            let sc = p.sc.as_ptr().add((b * 8 + j) * TILE);
            let s0 = _mm512_loadu_si512(sc as *const _);
            let s1 = _mm512_loadu_si512(sc.add(16) as *const _);
            for c in 0..XR {
                blk[c][0] = _mm512_add_epi32(blk[c][0], _mm512_mullo_epi32(run[c][0], s0));
                blk[c][1] = _mm512_add_epi32(blk[c][1], _mm512_mullo_epi32(run[c][1], s1));
            }
        }
        let d = p.d.as_ptr().add(b * TILE);
        let dm = p.dmin.as_ptr().add(b * TILE);
        let (d0, d1) = (_mm512_loadu_ps(d), _mm512_loadu_ps(d.add(16)));
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

//! `y = x Wᵀ` for GGUF block-quantized `W`, in llama.cpp's arithmetic: each row of `x` is
//! quantized to the weight type's dot partner (Q8_0, Q8_1 or Q8_K) and the products are those
//! of the two sets of quantized values, so results match llama.cpp's to float rounding.
//!
//! - Few rows (decode): integer dot products straight from the stored blocks (candle's kernels,
//!   and ours for Q5_0, which candle computes in scalar code), spread over rayon's threads.
//! - Many rows (prefill): one tile of `ROW_TILE` weight rows at a time is dequantized into a
//!   reused per-thread scratch and multiplied with `gemm` against the activations as the dot
//!   products see them (quantized, then widened). The dequantization costs one pass over the
//!   weights per call, which the rows amortize; the row count where it starts to pay was
//!   measured per type (`cargo run --release --example quant_matmul`, docs/benchmarks.md).
//!
//! Either way an output column depends only on its weight row, the activations and which path
//! the row count picked, so a matrix computed in slices of whole tiles gives the same bits as
//! the whole matrix.

use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

#[cfg(test)]
use super::common::ROW_TILE;
use super::common::{gemm_tiles, Out};
use crate::error::{Error, Result};
use crate::weights::mat::MatView;

/// From this many rows of `x` on, a quantized matrix is dequantized per tile and multiplied
/// with gemm; below, integer dot products run on the blocks. Measured on a 2-core AVX-512 Xeon
/// with `examples/quant_matmul.rs` (docs/benchmarks.md): the 32-value types cross between 8
/// and 12 rows, the other K-quants (slower to dequantize) between 32 and 48, and Q4_K and Q6_K,
/// whose dot kernels serve four rows per weight block, between 64 and 96 and between 96 and
/// 128. With AVX-512 VNNI, Q4_K's and Q6_K's many-row paths stay in integers
/// (`vnni`) and win from between 16 and 24 rows and between 24 and 32.
pub fn gemm_rows(t: GgmlDType) -> usize {
    match t {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0 => {
            12
        }
        #[cfg(target_arch = "x86_64")]
        GgmlDType::Q4K if super::vnni::available() => 20,
        #[cfg(target_arch = "x86_64")]
        GgmlDType::Q6K if super::vnni::available() => 28,
        GgmlDType::Q4K => 80,
        GgmlDType::Q6K => 112,
        _ => 40,
    }
}

/// Writes `x · wᵀ` into columns `col0 .. col0 + w.rows` of `y` (`[m, ldy]`) on the path given:
/// dequantized tiles and gemm, or integer dot products. The engine picks the path by
/// [`gemm_rows`]; the measurement that chose it (`examples/quant_matmul.rs`) picks both.
#[allow(clippy::too_many_arguments)]
pub fn quant_with(
    x: &[f32],
    m: usize,
    w: MatView,
    t: GgmlDType,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
    gemm: bool,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if x.len() < m * k
        || y.len() < m * ldy
        || col0 + n > ldy
        || w.data.len() < w.form.row_bytes(k) * n
    {
        return Err(Error::Internal(
            "quantized matmul of mismatched sizes".into(),
        ));
    }
    match t {
        GgmlDType::Q4_0 => run::<kq::BlockQ4_0>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q4_1 => run::<kq::BlockQ4_1>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q5_0 => run::<kq::BlockQ5_0>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q5_1 => run::<kq::BlockQ5_1>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q8_0 => run::<kq::BlockQ8_0>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q2K => run::<kq::BlockQ2K>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q3K => run::<kq::BlockQ3K>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q4K => run::<kq::BlockQ4K>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q5K => run::<kq::BlockQ5K>(x, m, w, y, ldy, col0, gemm),
        GgmlDType::Q6K => run::<kq::BlockQ6K>(x, m, w, y, ldy, col0, gemm),
        other => Err(Error::Invalid(format!(
            "matrices of type {} cannot be multiplied",
            crate::weights::mat::type_name(other)
        ))),
    }
}

/// `bytes` as whole, aligned blocks of `T`.
fn blocks<T>(bytes: &[u8]) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return Err(Error::Internal(
            "quantized rows are not whole, aligned blocks".into(),
        ));
    }
    // SAFETY: whole and aligned blocks (checked above); block types are plain data.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

thread_local! {
    /// The quantized rows of `x`, reused across calls (u64 for any block's alignment).
    static XQ: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn run<T: GgmlType>(
    x: &[f32],
    m: usize,
    w: MatView,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
    gemm: bool,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if !k.is_multiple_of(T::BLCK_SIZE) {
        return Err(Error::Internal(format!(
            "rows of {k} values are not whole {}-value blocks",
            T::BLCK_SIZE
        )));
    }
    let kb = k / T::BLCK_SIZE;
    let wb: &[T] = blocks(&w.data[..w.form.row_bytes(k) * n])?;
    XQ.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let words = (m * kb * std::mem::size_of::<T::VecDotType>()).div_ceil(8);
        if scratch.len() < words {
            scratch.resize(words, 0);
        }
        // SAFETY: the scratch holds at least m·kb blocks, u64-aligned; every block is written
        // by `from_float` below before it is read.
        let xq: &mut [T::VecDotType] = unsafe {
            std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut T::VecDotType, m * kb)
        };
        // Rows are quantized on every thread: candle's quantizers are scalar, and on a long
        // prefill they cost a tenth of the step when run on one.
        let rows = x[..m * k]
            .par_chunks_exact(k)
            .zip(xq.par_chunks_exact_mut(kb));
        rows.with_min_len(4)
            .for_each(|(xr, qr)| T::VecDotType::from_float(xr, qr));
        #[cfg(target_arch = "x86_64")]
        if gemm && matches!(T::DTYPE, GgmlDType::Q4K | GgmlDType::Q6K) && super::vnni::available() {
            use super::vnni::Kind;
            // Integers all the way (llama.cpp's arithmetic): no widened tiles.
            let kind = if T::DTYPE == GgmlDType::Q4K {
                Kind::Q4K
            } else {
                Kind::Q6K
            };
            let aux = block_sums::<T>(xq);
            // SAFETY: plain-data blocks viewed as their bytes.
            let (xb, wbytes) = unsafe {
                (
                    std::slice::from_raw_parts(xq.as_ptr() as *const u8, std::mem::size_of_val(xq)),
                    std::slice::from_raw_parts(wb.as_ptr() as *const u8, std::mem::size_of_val(wb)),
                )
            };
            super::vnni::matmul(kind, xb, &aux, m, wbytes, n, kb, y, ldy, col0);
            return Ok(());
        }
        if gemm {
            // The activations as the dot products see them.
            let mut xr = vec![0f32; m * k];
            xr.par_chunks_exact_mut(k)
                .zip(xq.par_chunks_exact(kb))
                .with_min_len(4)
                .for_each(|(dst, qr)| T::VecDotType::to_float(qr, dst));
            gemm_tiles(&xr, m, n, k, y, ldy, col0, None, |r, dst| {
                T::to_float(&wb[r * kb..(r + 1) * kb], dst)
            });
        } else {
            let xd = block_sums::<T>(xq);
            dots::<T>(xq, &xd, m, wb, n, k, y, ldy, col0);
        }
        Ok(())
    })
}

/// What our kernels read of each activation block, worked out once for every weight row to
/// use: for Q5_0 and Q8_0 the block's scale (each Q8_0 block starts with its f16 scale); for
/// Q4_K the Q8_K block's scale and its eight sums of 32 values (from its sixteen sums of 16),
/// [`Q4K_AUX`] floats a block. Empty for the types candle's kernels compute.
fn block_sums<T: GgmlType>(xq: &[T::VecDotType]) -> Vec<f32> {
    let bytes = std::mem::size_of::<T::VecDotType>();
    // SAFETY: xq is plain-data blocks.
    let raw =
        unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const u8, std::mem::size_of_val(xq)) };
    let i16_at = |b: &[u8], o: usize| i16::from_le_bytes([b[o], b[o + 1]]) as f32;
    match T::DTYPE {
        GgmlDType::Q5_0 | GgmlDType::Q8_0 => raw
            .chunks_exact(bytes)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::Q4K => raw
            .chunks_exact(bytes)
            .flat_map(|b| {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let sums: [f32; 8] =
                    std::array::from_fn(|j| i16_at(b, 260 + 4 * j) + i16_at(b, 262 + 4 * j));
                std::iter::once(d).chain(sums)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Floats of [`block_sums`] per Q8_K block, for Q4_K.
const Q4K_AUX: usize = 9;

/// Integer dot products of every weight row with every quantized row of `x`; each task takes
/// a run of weight rows, so a row is read from memory once for all rows of `x`.
#[allow(clippy::too_many_arguments)]
fn dots<T: GgmlType>(
    xq: &[T::VecDotType],
    xd: &[f32],
    m: usize,
    wb: &[T],
    n: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
) {
    let kb = k / T::BLCK_SIZE;
    let out = Out(y.as_mut_ptr());
    let per = (n / (rayon::current_num_threads() * 8)).clamp(16, 512);
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut v = [0f32; 8];
        let mut j = t * per;
        let end = ((t + 1) * per).min(n);
        #[cfg(target_arch = "x86_64")]
        if m == 1 && matches!(T::DTYPE, GgmlDType::Q5_0 | GgmlDType::Q8_0) && x86::has_avx2() {
            let q5 = T::DTYPE == GgmlDType::Q5_0;
            let x = xq.as_ptr() as *const u8;
            while j + 4 <= end {
                let w: [*const u8; 4] = std::array::from_fn(|r| wb[(j + r) * kb..].as_ptr() as _);
                let mut o = [0f32; 4];
                // SAFETY: as for `dot_rows`: four whole rows of kb blocks of the DTYPE's
                // layout, one Q8_0 row of kb blocks and its kb scales; AVX2, FMA and F16C.
                unsafe {
                    if q5 {
                        x86::rows_by_four::<true>(kb, &w, x, xd.as_ptr(), &mut o)
                    } else {
                        x86::rows_by_four::<false>(kb, &w, x, xd.as_ptr(), &mut o)
                    }
                }
                for (r, o) in o.iter().enumerate() {
                    // SAFETY: as below.
                    unsafe { *out.at(col0 + j + r) = *o };
                }
                j += 4;
            }
        }
        for j in j..end {
            let row = &wb[j * kb..(j + 1) * kb];
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(rows_per_pass(T::DTYPE));
                let x = &xq[i * kb..(i + nx) * kb];
                let per = xd.len() / (m * kb).max(1);
                let aux = xd.get(i * kb * per..(i + nx) * kb * per);
                dot_rows::<T>(k, row, x, aux, nx, &mut v);
                for (r, v) in v[..nx].iter().enumerate() {
                    // SAFETY: in bounds (checked by the caller); column col0 + j belongs to
                    // this task alone.
                    unsafe { *out.at((i + r) * ldy + col0 + j) = *v };
                }
                i += nx;
            }
        }
    });
}

/// Activation rows [`dot_rows`] takes at once: eight for our Q5_0 and Q8_0 kernels (a batch of
/// eight reads Gemma 3's 178 MB head once instead of twice), four for the others.
fn rows_per_pass(t: GgmlDType) -> usize {
    match t {
        GgmlDType::Q5_0 | GgmlDType::Q8_0 => 8,
        _ => 4,
    }
}

/// `out[r] = w · x[r]` for the `nx` (1 to [`rows_per_pass`]) quantized rows of `x`: ours for Q5_0 (candle's is
/// scalar), Q8_0 (candle's widens each block's scales through a call), Q4_K and Q6_K, which decode
/// each weight block once for all rows (Q5_0 and Q8_0 take the rows' block scales `xd` already
/// widened); candle's kernel per row for the others.
#[inline]
fn dot_rows<T: GgmlType>(
    k: usize,
    w: &[T],
    x: &[T::VecDotType],
    xd: Option<&[f32]>,
    nx: usize,
    out: &mut [f32; 8],
) {
    let kb = k / T::BLCK_SIZE;
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(xd)) = (x86::has_avx2(), xd) {
        if matches!(T::DTYPE, GgmlDType::Q5_0 | GgmlDType::Q8_0) && xd.len() == nx * kb {
            let wp = w.as_ptr() as *const u8;
            let xp = x.as_ptr() as *const u8;
            let at = |r: usize| r.min(nx - 1) * kb;
            let rows: [*const u8; 8] = std::array::from_fn(|r| xp.wrapping_add(at(r) * 34));
            let scales: [*const f32; 8] = std::array::from_fn(|r| xd[at(r)..].as_ptr());
            // SAFETY: the DTYPE names the block layouts (Q5_0: 22 bytes, Q8_0: 34, each with
            // its Q8_0 partner of 34 bytes); w holds kb blocks, x nx rows of kb and xd nx rows
            // of kb scales; the CPU has AVX2, FMA and F16C.
            unsafe { x86::dot_rows(T::DTYPE == GgmlDType::Q5_0, kb, wp, &rows, &scales, nx, out) };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(xd)) = (x86::has_avx2(), xd) {
        if T::DTYPE == GgmlDType::Q4K && xd.len() == nx * kb * Q4K_AUX {
            let xp = x.as_ptr() as *const u8;
            let at = |r: usize| r.min(nx - 1) * kb;
            let rows: [*const u8; 8] = std::array::from_fn(|r| xp.wrapping_add(at(r) * 292));
            let aux: [*const f32; 8] = std::array::from_fn(|r| xd[at(r) * Q4K_AUX..].as_ptr());
            // SAFETY: Q4_K blocks are 144 bytes and their Q8_K partners 292; w holds kb
            // blocks, x nx rows of kb and xd their Q4K_AUX floats a block; the CPU has AVX2,
            // FMA and F16C.
            unsafe { x86::dot_rows_q4k(kb, w.as_ptr() as *const u8, &rows, &aux, nx, out) };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    // Ours for every row count, one row included (candle's is faster alone, 1.7 against
    // 2.3 ms on a 11008×4096 matrix): a row must get the same bits alone and beside others.
    if T::DTYPE == GgmlDType::Q6K && x86::has_avx2() {
        let xp = x.as_ptr() as *const u8;
        let rows: [*const u8; 8] =
            std::array::from_fn(|r| xp.wrapping_add(r.min(nx - 1) * kb * 292));
        // SAFETY: Q6_K blocks are 210 bytes and their Q8_K partners 292; w holds kb blocks
        // and x nx rows of kb; the CPU has AVX2, FMA and F16C.
        unsafe { x86::dot_rows_q6k(kb, w.as_ptr() as *const u8, &rows, nx, out) };
        return;
    }
    let _ = xd;
    for (r, o) in out[..nx].iter_mut().enumerate() {
        *o = T::vec_dot(k, w, &x[r * kb..(r + 1) * kb]);
    }
}

/// Whether our AVX2 kernels run here (not when `AIRLLM_PORTABLE_KERNEL` asks for the
/// portable ones).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
    x86::has_avx2()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::common::{hsum, q4k_scale_min};
    use std::arch::x86_64::*;

    pub fn has_avx2() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("AIRLLM_PORTABLE_KERNEL").is_none()
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }

    /// The f16 at `p`, widened in a register (a call into `half` per block costs as much as
    /// the block's arithmetic).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned() as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
    }

    /// Asks for the cache lines of the block `len` bytes at `p` plus 1 KiB: the weights stream
    /// from memory once, and rows are contiguous, so this runs into the next rows. Measured:
    /// Gemma 3's Q8_0 head (178 MB) from 18 to 10 ms at one row, near the memory's speed.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn prefetch(p: *const u8, len: usize) {
        let mut o = 0;
        while o < len {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(1024 + o) as *const i8);
            o += 64;
        }
    }

    /// A Q4_K weight row times `nx` (1 to 4) Q8_K rows `x`, over `nb` 256-value blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_q4k(
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        aux: &[*const f32; 8],
        nx: usize,
        out: &mut [f32; 8],
    ) {
        match nx {
            1 => rows_q4k::<1>(nb, w, x, aux, out),
            2 => rows_q4k::<2>(nb, w, x, aux, out),
            3 => rows_q4k::<3>(nb, w, x, aux, out),
            _ => rows_q4k::<4>(nb, w, x, aux, out),
        }
    }

    /// Q4_K blocks (144 bytes) are `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight
    /// runs of 32 values, run `j` worth `d·sc_j·q - dmin·m_j` with 6-bit `sc_j`, `m_j` packed in
    /// `scales`; each 32 bytes of `qs` hold two runs, low nibbles first. Q8_K blocks (292 bytes)
    /// are `d: f32, qs: [i8; 256], bsums: [i16; 16]`; the minimums need only the sums of each
    /// run, which `aux` holds after the block's scale (`super::block_sums`). Each weight block
    /// is decoded once for every row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_q4k<const NX: usize>(
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        aux: &[*const f32; 8],
        out: &mut [f32; 8],
    ) {
        let low4 = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); NX];
        let mut mins = [_mm256_setzero_ps(); NX];
        for b in 0..nb {
            let wp = w.add(b * 144);
            prefetch(wp, 144);
            let d = half(wp);
            let dmin = half(wp.add(2));
            let s = std::slice::from_raw_parts(wp.add(4), 12);
            let mut sc = [0i16; 8];
            let mut mn = [0f32; 8];
            for j in 0..8 {
                let (a, m) = q4k_scale_min(s, j);
                sc[j] = a as i16;
                mn[j] = m as f32;
            }
            let qs = wp.add(16);
            let mut sum = [_mm256_setzero_si256(); NX];
            for c in 0..4 {
                let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(q, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                let (s0, s1) = (
                    _mm256_set1_epi16(sc[2 * c]),
                    _mm256_set1_epi16(sc[2 * c + 1]),
                );
                for (r, acc) in sum.iter_mut().enumerate() {
                    let xq = x[r].add(b * 292 + 4 + 64 * c);
                    let x0 = _mm256_loadu_si256(xq as *const __m256i);
                    let x1 = _mm256_loadu_si256(xq.add(32) as *const __m256i);
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), s1);
                    *acc = _mm256_add_epi32(*acc, _mm256_add_epi32(p0, p1));
                }
            }
            let mn = _mm256_loadu_ps(mn.as_ptr());
            for r in 0..NX {
                let a = aux[r].add(b * super::Q4K_AUX);
                let dx = *a;
                let m = _mm256_mul_ps(mn, _mm256_loadu_ps(a.add(1)));
                mins[r] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), m, mins[r]);
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sum[r]), acc[r]);
            }
        }
        for r in 0..NX {
            out[r] = hsum(_mm256_sub_ps(acc[r], mins[r]));
        }
    }

    /// A Q6_K weight row times `nx` (1 to 4) Q8_K rows `x`, over `nb` 256-value blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_q6k(
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        nx: usize,
        out: &mut [f32; 8],
    ) {
        match nx {
            1 => rows_q6k::<1>(nb, w, x, out),
            2 => rows_q6k::<2>(nb, w, x, out),
            3 => rows_q6k::<3>(nb, w, x, out),
            _ => rows_q6k::<4>(nb, w, x, out),
        }
    }

    /// Q6_K blocks (210 bytes) are `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`:
    /// each half of 128 values takes 64 bytes of `ql` (low 4 bits: values 0–31 and 32–63 in
    /// the low nibbles of its two 32-byte rows, 64–127 in the high nibbles) and 32 of `qh` (2
    /// bits a value, four values a byte), minus 32, with one scale per 16 values. The products
    /// use the unsigned values, and 32 times the scaled sums of `x` (its `bsums`) come off.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_q6k<const NX: usize>(
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        out: &mut [f32; 8],
    ) {
        let low4 = _mm256_set1_epi8(0x0f);
        let two = _mm256_set1_epi8(0x03);
        let mut acc = [_mm256_setzero_ps(); NX];
        for b in 0..nb {
            let wp = w.add(b * 210);
            prefetch(wp, 210);
            let d = half(wp.add(208));
            let sc8 = _mm_loadu_si128(wp.add(192) as *const __m128i);
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            let scale = |i: usize| *(wp.add(192 + i) as *const i8) as i16;
            let mut sum = [_mm256_setzero_si256(); NX];
            for h in 0..2 {
                let ql = wp.add(64 * h);
                let qh = _mm256_loadu_si256(wp.add(128 + 32 * h) as *const __m256i);
                let l0 = _mm256_loadu_si256(ql as *const __m256i);
                let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let hi = |s: i32| -> __m256i {
                    let v = match s {
                        0 => qh,
                        2 => _mm256_srli_epi16::<2>(qh),
                        4 => _mm256_srli_epi16::<4>(qh),
                        _ => _mm256_srli_epi16::<6>(qh),
                    };
                    _mm256_slli_epi16::<4>(_mm256_and_si256(v, two))
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(l0, low4), hi(0)),
                    _mm256_or_si256(_mm256_and_si256(l1, low4), hi(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), low4), hi(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), low4), hi(6)),
                ];
                // Values 0–15 of each 32 sit in the low 128 bits, 16–31 in the high.
                let s: [__m256i; 4] = std::array::from_fn(|c| {
                    let i = 8 * h + 2 * c;
                    _mm256_set_m128i(_mm_set1_epi16(scale(i + 1)), _mm_set1_epi16(scale(i)))
                });
                for (r, acc) in sum.iter_mut().enumerate() {
                    let xq = x[r].add(b * 292 + 4 + 128 * h);
                    for c in 0..4 {
                        let xv = _mm256_loadu_si256(xq.add(32 * c) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], xv), s[c]);
                        *acc = _mm256_add_epi32(*acc, p);
                    }
                }
            }
            for r in 0..NX {
                let xb = x[r].add(b * 292);
                let dx = (xb as *const f32).read_unaligned();
                let bs = _mm256_loadu_si256(xb.add(260) as *const __m256i);
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs));
                let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[r], off));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), s, acc[r]);
            }
        }
        for r in 0..NX {
            out[r] = hsum(acc[r]);
        }
    }

    /// A Q5_0 or Q8_0 weight row (`q5`) times `nx` (1 to 8) Q8_0 rows `x`, over `nb` blocks.
    /// Five to seven rows run the eight-row kernel, whose extra rows repeat the last (`x`
    /// repeats it) and are not written back by the caller.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(
        q5: bool,
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        xd: &[*const f32; 8],
        nx: usize,
        out: &mut [f32; 8],
    ) {
        match (q5, nx) {
            (true, 1) => rows::<true, 1>(nb, w, x, xd, out),
            (true, 2) => rows::<true, 2>(nb, w, x, xd, out),
            (true, 3) => rows::<true, 3>(nb, w, x, xd, out),
            (true, 4) => rows::<true, 4>(nb, w, x, xd, out),
            (true, _) => rows::<true, 8>(nb, w, x, xd, out),
            (false, 1) => rows::<false, 1>(nb, w, x, xd, out),
            (false, 2) => rows::<false, 2>(nb, w, x, xd, out),
            (false, 3) => rows::<false, 3>(nb, w, x, xd, out),
            (false, 4) => rows::<false, 4>(nb, w, x, xd, out),
            (false, _) => rows::<false, 8>(nb, w, x, xd, out),
        }
    }

    /// The 32 values of a Q5_0 (`Q5`) or Q8_0 block at `p` as signed bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const Q5: bool>(p: *const u8) -> __m256i {
        if !Q5 {
            return _mm256_loadu_si256(p.add(2) as *const __m256i);
        }
        // Byte i of the expanded high bits reads byte i/8 of qh and tests bit i%8.
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let low4 = _mm_set1_epi8(0x0f);
        let qh = (p.add(2) as *const u32).read_unaligned();
        let qs = _mm_loadu_si128(p.add(6) as *const __m128i);
        let lo = _mm_and_si128(qs, low4);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low4);
        let nib = _mm256_set_m128i(hi, lo);
        let h = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), pick);
        let h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
        let fifth = _mm256_and_si256(h, _mm256_set1_epi8(0x10));
        _mm256_sub_epi8(_mm256_or_si256(nib, fifth), _mm256_set1_epi8(16))
    }

    /// Four Q5_0 or Q8_0 weight rows `w` times one Q8_0 row `x`, over `nb` blocks: the decode
    /// step. A call per weight row of 20 blocks (Gemma 3) spends as long on the call as on the
    /// row; four rows share each activation block, each with two FMA chains (as in `rows`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_by_four<const Q5: bool>(
        nb: usize,
        w: &[*const u8; 4],
        x: *const u8,
        xd: *const f32,
        out: &mut [f32; 4],
    ) {
        let wsize = if Q5 { 22 } else { 34 };
        let ones = _mm256_set1_epi16(1);
        // Two accumulators per row, alternating by block, as in `rows`: the same sums.
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for b in 0..nb {
            let q = _mm256_loadu_si256(x.add(b * 34 + 2) as *const __m256i);
            let dx = *xd.add(b);
            for (r, a) in acc.iter_mut().enumerate() {
                let wp = w[r].add(b * wsize);
                prefetch(wp, wsize);
                let v = block::<Q5>(wp);
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(q, v));
                let p = _mm256_madd_epi16(p, ones);
                let d = _mm256_set1_ps(half(wp) * dx);
                let a = &mut a[b & 1];
                *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }

    /// Q8_0 blocks are `d: f16, qs: [i8; 32]`. Q5_0 blocks are `d: f16, qh: u32, qs: [u8; 16]`:
    /// value `j` is nibble `j` of `qs` (low nibbles first) with bit `j` of `qh` as its fifth
    /// bit, minus 16. Each weight block is decoded once and multiplied with every row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const Q5: bool, const NX: usize>(
        nb: usize,
        w: *const u8,
        x: &[*const u8; 8],
        xd: &[*const f32; 8],
        out: &mut [f32; 8],
    ) {
        let wsize = if Q5 { 22 } else { 34 };
        let ones = _mm256_set1_epi16(1);
        // Two accumulators per row, alternating by block (one chain of dependent FMAs would
        // set the pace), for every row count and in `rows_by_four` alike: a row's sum then has
        // the same bits however many rows share the pass (speculative verification relies
        // on it).
        let mut acc = [[_mm256_setzero_ps(); 2]; NX];
        for b in 0..nb {
            let wp = w.add(b * wsize);
            prefetch(wp, wsize);
            let v = block::<Q5>(wp);
            // maddubs wants unsigned times signed: |v| times q with v's sign moved onto q.
            let av = _mm256_sign_epi8(v, v);
            let dw = half(wp);
            for (r, a) in acc.iter_mut().enumerate() {
                let xp = x[r].add(b * 34);
                let q = _mm256_loadu_si256(xp.add(2) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(q, v)), ones);
                let d = dw * *xd[r].add(b);
                let a = &mut a[b & 1];
                *a = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::mat::Form;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// The exact product of the quantized weights and the quantized activations, in f64, and
    /// the sum of the products' magnitudes (the scale of rounding errors).
    fn reference<T: GgmlType>(
        x: &[f32],
        m: usize,
        wb: &[T],
        n: usize,
        k: usize,
    ) -> Vec<(f64, f64)> {
        let kb = k / T::BLCK_SIZE;
        let mut wf = vec![0f32; n * k];
        T::to_float(wb, &mut wf);
        let mut xf = vec![0f32; m * k];
        for i in 0..m {
            let mut q = vec![T::VecDotType::zeros(); kb];
            T::VecDotType::from_float(&x[i * k..(i + 1) * k], &mut q);
            T::VecDotType::to_float(&q, &mut xf[i * k..(i + 1) * k]);
        }
        let mut y = vec![(0f64, 0f64); m * n];
        for i in 0..m {
            for j in 0..n {
                let p = (0..k).map(|l| xf[i * k + l] as f64 * wf[j * k + l] as f64);
                y[i * n + j] = p.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
            }
        }
        y
    }

    fn check<T: GgmlType>(t: GgmlDType) {
        let dev = Device::Cpu;
        let (n, k) = (2 * ROW_TILE + 7, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let data = QTensor::quantize(&w, t)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        // Copy into u64 storage so the blocks are aligned.
        let mut store = vec![0u64; data.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut store)[..data.len()].copy_from_slice(&data);
        let bytes = &bytemuck::cast_slice::<u64, u8>(&store)[..data.len()];
        let view = MatView {
            form: Form::Q(t),
            rows: n,
            cols: k,
            data: bytes,
        };
        let wb: &[T] = blocks(bytes).unwrap();
        // From the threshold on, every remainder of the integer tiles' four rows.
        let g = gemm_rows(t);
        for m in [1, g - 1, g, g + 1, g + 2, g + 3, 19] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = reference(&x, m, wb, n, k);
            let mut y = vec![0f32; m * n];
            let gemm = m >= gemm_rows(t);
            quant_with(&x, m, view, t, &mut y, n, 0, gemm).unwrap();
            // Q4_1 and Q5_1 dot products use the activations' block sums rounded to f16, as
            // llama.cpp's do: a relative error of 2^-11 on a term of the size of the magnitudes.
            for (a, (b, mag)) in y.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-3 * mag,
                    "{t:?} m={m}: {a} vs {b}"
                );
            }
            // In slices of whole tiles and the rest: the same bits.
            let rb = view.form.row_bytes(k);
            let mut sliced = vec![0f32; m * n];
            for (s, len) in [(0, ROW_TILE), (ROW_TILE, n - ROW_TILE)] {
                let v = MatView {
                    form: view.form,
                    rows: len,
                    cols: k,
                    data: &bytes[s * rb..(s + len) * rb],
                };
                quant_with(&x, m, v, t, &mut sliced, n, s, gemm).unwrap();
            }
            assert_eq!(y, sliced, "{t:?} m={m}");
            // Below the threshold each row has the bits it has alone (speculative
            // verification scores several rows and must match decoding one).
            if !gemm {
                for i in 0..m {
                    let mut alone = vec![0f32; n];
                    quant_with(&x[i * k..(i + 1) * k], 1, view, t, &mut alone, n, 0, false)
                        .unwrap();
                    assert_eq!(&y[i * n..(i + 1) * n], &alone[..], "{t:?} m={m} row {i}");
                }
            }
        }
    }

    #[test]
    fn every_type_and_path_is_the_product_of_the_quantized_values() {
        check::<kq::BlockQ4_0>(GgmlDType::Q4_0);
        check::<kq::BlockQ4_1>(GgmlDType::Q4_1);
        check::<kq::BlockQ5_0>(GgmlDType::Q5_0);
        check::<kq::BlockQ5_1>(GgmlDType::Q5_1);
        check::<kq::BlockQ8_0>(GgmlDType::Q8_0);
        check::<kq::BlockQ2K>(GgmlDType::Q2K);
        check::<kq::BlockQ3K>(GgmlDType::Q3K);
        check::<kq::BlockQ4K>(GgmlDType::Q4K);
        check::<kq::BlockQ5K>(GgmlDType::Q5K);
        check::<kq::BlockQ6K>(GgmlDType::Q6K);
    }

    fn agrees_with_candle<T: GgmlType>(t: GgmlDType) {
        let k = 768;
        let w = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap();
        let data = QTensor::quantize(&w, t)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let mut ws = vec![T::zeros(); k / T::BLCK_SIZE];
        // SAFETY: the same number of bytes, plain-data blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), ws.as_mut_ptr() as *mut u8, data.len())
        };
        let kb = k / T::BLCK_SIZE;
        let most = rows_per_pass(t);
        let mut xs = vec![T::VecDotType::zeros(); most * kb];
        let mut want = [0f32; 8];
        for r in 0..most {
            let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37 + r as f32).sin()).collect();
            T::VecDotType::from_float(&x, &mut xs[r * kb..(r + 1) * kb]);
            want[r] = T::vec_dot_unopt(k, &ws, &xs[r * kb..(r + 1) * kb]);
        }
        for nx in 1..=most {
            let mut got = [0f32; 8];
            let xd = block_sums::<T>(&xs[..nx * kb]);
            dot_rows::<T>(k, &ws, &xs[..nx * kb], Some(&xd), nx, &mut got);
            for (g, w) in got[..nx].iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{t:?} nx={nx}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn our_dot_kernels_agree_with_candles_portable_ones() {
        agrees_with_candle::<kq::BlockQ5_0>(GgmlDType::Q5_0);
        agrees_with_candle::<kq::BlockQ8_0>(GgmlDType::Q8_0);
        agrees_with_candle::<kq::BlockQ4K>(GgmlDType::Q4K);
        agrees_with_candle::<kq::BlockQ6K>(GgmlDType::Q6K);
    }
}

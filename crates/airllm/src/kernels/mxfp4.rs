//! `y = x Wᵀ` for MXFP4 `W` in llama.cpp's arithmetic ([`Form::Mxfp4`] with `q8`): each row of
//! `x` is quantized to Q8_0, and a block's product is the integer dot product of the doubled
//! e2m1 values ([`E2M1_X2`]) with the Q8_0 values, times half the e8m0 scale and the Q8_0
//! scale, as llama.cpp's CPU kernel computes it.
//!
//! - Few rows (decode): integer dot products straight from the stored blocks; a weight block
//!   is decoded once (a byte shuffle looks its nibbles up) for up to eight rows of `x`.
//! - Many rows (prefill): tiles of weight rows are widened exactly and multiplied with `gemm`
//!   against the rows of `x` as the dot products see them (quantized, then widened).
//!
//! The f32 form (transformers' arithmetic) widens its blocks in the dense kernels instead.

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use rayon::prelude::*;

use super::common::{gemm_tiles, Out};
use crate::error::{Error, Result};
use crate::weights::mat::{e8m0_half, widen_mxfp4, MatView, E2M1_X2, MXFP4_BLOCK_BYTES};

/// From this many rows of `x` on, widened tiles and gemm (as for the 32-value GGUF types).
pub const GEMM_ROWS: usize = 12;

/// Rows of `x` one pass over a weight row serves.
const PASS: usize = 8;

/// Writes `x · wᵀ` into columns `col0 .. col0 + w.rows` of `y` (`[m, ldy]`), on the path the
/// row count picks (`gemm` forces the tiles, for measurements).
#[allow(clippy::too_many_arguments)]
pub fn matmul_q8(
    x: &[f32],
    m: usize,
    w: MatView,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
    gemm: bool,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if !k.is_multiple_of(32) {
        return Err(Error::Internal(format!(
            "MXFP4 rows of {k} values are not whole blocks"
        )));
    }
    let kb = k / 32;
    let rb = kb * MXFP4_BLOCK_BYTES;
    let mut xq = vec![BlockQ8_0::zeros(); m * kb];
    x[..m * k]
        .par_chunks_exact(k)
        .zip(xq.par_chunks_exact_mut(kb))
        .with_min_len(4)
        .for_each(|(xr, qr)| BlockQ8_0::from_float(xr, qr));
    if gemm {
        let mut xr = vec![0f32; m * k];
        xr.par_chunks_exact_mut(k)
            .zip(xq.par_chunks_exact(kb))
            .with_min_len(4)
            .for_each(|(dst, qr)| BlockQ8_0::to_float(qr, dst));
        gemm_tiles(&xr, m, n, k, y, ldy, col0, None, |r, dst| {
            widen_mxfp4(&w.data[r * rb..(r + 1) * rb], dst)
        });
        return Ok(());
    }
    let xb = q8_bytes(&xq);
    let scales = q8_scales(xb);
    let out = Out(y.as_mut_ptr());
    let per = (n / (rayon::current_num_threads() * 8)).clamp(16, 512);
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut acc = [0f32; PASS];
        for j in t * per..((t + 1) * per).min(n) {
            let row = &w.data[j * rb..(j + 1) * rb];
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(PASS);
                dot_rows(
                    row,
                    &xb[i * kb * Q8..(i + nx) * kb * Q8],
                    &scales[i * kb..(i + nx) * kb],
                    kb,
                    nx,
                    &mut acc,
                );
                for (r, a) in acc[..nx].iter().enumerate() {
                    // SAFETY: in bounds (the caller checked the sizes); column col0 + j
                    // belongs to this task alone.
                    unsafe { *out.at((i + r) * ldy + col0 + j) = *a };
                }
                i += nx;
            }
        }
    });
    Ok(())
}

/// Bytes of a Q8_0 block: its f16 scale, then 32 values.
const Q8: usize = 34;

/// Q8_0 blocks as their bytes (candle keeps the fields to itself).
fn q8_bytes(xq: &[BlockQ8_0]) -> &[u8] {
    // SAFETY: Q8_0 blocks are plain data of 34 bytes.
    unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const u8, std::mem::size_of_val(xq)) }
}

/// Each Q8_0 block's scale, widened.
fn q8_scales(xb: &[u8]) -> Vec<f32> {
    xb.chunks_exact(Q8)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// `acc[r]` = the weight row (kb blocks) dotted with row `r` of the Q8_0 bytes `xq` (`nx`
/// rows of kb blocks, their scales in `xd`).
fn dot_rows(row: &[u8], xq: &[u8], xd: &[f32], kb: usize, nx: usize, acc: &mut [f32; PASS]) {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::has_avx2() {
        // SAFETY: row holds kb blocks of 17 bytes, xq and xd nx rows of kb; AVX2 and FMA.
        unsafe { x86::dot_rows(row, xq, xd, kb, nx, acc) };
        return;
    }
    for (r, a) in acc[..nx].iter_mut().enumerate() {
        let mut sum = 0f32;
        for b in 0..kb {
            let w = &row[b * MXFP4_BLOCK_BYTES..(b + 1) * MXFP4_BLOCK_BYTES];
            let q = &xq[(r * kb + b) * Q8 + 2..(r * kb + b + 1) * Q8];
            let mut s = 0i32;
            for j in 0..16 {
                s += E2M1_X2[(w[1 + j] & 15) as usize] as i32 * q[j] as i8 as i32;
                s += E2M1_X2[(w[1 + j] >> 4) as usize] as i32 * q[j + 16] as i8 as i32;
            }
            sum += e8m0_half(w[0]) * xd[r * kb + b] * s as f32;
        }
        *a = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(
        row: &[u8],
        xq: &[u8],
        xd: &[f32],
        kb: usize,
        nx: usize,
        acc: &mut [f32; PASS],
    ) {
        let table = _mm_loadu_si128(E2M1_X2.as_ptr() as *const __m128i);
        let low = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_ps(); PASS];
        for b in 0..kb {
            let p = row.as_ptr().add(b * MXFP4_BLOCK_BYTES);
            let s = e8m0_half(*p);
            let q = _mm_loadu_si128(p.add(1) as *const __m128i);
            let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, low));
            let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low));
            let w = _mm256_set_m128i(hi, lo);
            let aw = _mm256_sign_epi8(w, w);
            for (r, sum) in sums[..nx].iter_mut().enumerate() {
                let y =
                    _mm256_loadu_si256(xq.as_ptr().add((r * kb + b) * Q8 + 2) as *const __m256i);
                let prod =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w)), ones);
                let d = _mm256_set1_ps(s * *xd.get_unchecked(r * kb + b));
                *sum = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), *sum);
            }
        }
        for (a, s) in acc[..nx].iter_mut().zip(&sums) {
            *a = crate::kernels::common::hsum(*s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::mat::Form;

    /// Random MXFP4 rows (scales around 2^-3) and their exact values.
    pub(crate) fn random_rows(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut bytes = vec![0u8; n * k / 32 * MXFP4_BLOCK_BYTES];
        for b in bytes.chunks_exact_mut(MXFP4_BLOCK_BYTES) {
            b[0] = 120 + (next() % 8) as u8;
            for q in &mut b[1..] {
                *q = next() as u8;
            }
        }
        let mut wide = vec![0f32; n * k];
        widen_mxfp4(&bytes, &mut wide);
        (bytes, wide)
    }

    /// Both paths compute the product of the Q8_0 rows of `x` with the exact weights.
    #[test]
    fn both_paths_are_the_product_of_the_quantized_values() {
        let (n, k) = (70, 256);
        let (bytes, wide) = random_rows(n, k, 7);
        for m in [1, 3, 9, 13] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0)
                .collect();
            let mut xq = vec![BlockQ8_0::zeros(); m * k / 32];
            for (xr, qr) in x.chunks(k).zip(xq.chunks_mut(k / 32)) {
                BlockQ8_0::from_float(xr, qr);
            }
            let mut xr = vec![0f32; m * k];
            for (d, q) in xr.chunks_mut(k).zip(xq.chunks(k / 32)) {
                BlockQ8_0::to_float(q, d);
            }
            let w = MatView {
                form: Form::Mxfp4 { q8: true },
                rows: n,
                cols: k,
                data: &bytes,
            };
            for gemm in [false, true] {
                let mut y = vec![0f32; m * n];
                matmul_q8(&x, m, w, &mut y, n, 0, gemm).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| xr[i * k + c] as f64 * wide[j * k + c] as f64)
                            .sum();
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "m {m} gemm {gemm} ({i}, {j}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_simd_kernel_is_the_portable_one() {
        let k = 512;
        let (bytes, _) = random_rows(1, k, 3);
        let x: Vec<f32> = (0..5 * k)
            .map(|i| ((i * 13 % 97) as f32 - 48.0) / 17.0)
            .collect();
        let mut xq = vec![BlockQ8_0::zeros(); 5 * k / 32];
        for (xr, qr) in x.chunks(k).zip(xq.chunks_mut(k / 32)) {
            BlockQ8_0::from_float(xr, qr);
        }
        let xb = q8_bytes(&xq);
        let xd = q8_scales(xb);
        let mut a = [0f32; PASS];
        dot_rows(&bytes, xb, &xd, k / 32, 5, &mut a);
        for r in 0..5 {
            let mut want = 0f32;
            for b in 0..k / 32 {
                let w = &bytes[b * 17..(b + 1) * 17];
                let at = (r * k / 32 + b) * Q8 + 2;
                let q = &xb[at..at + 32];
                let s: i32 = (0..16)
                    .map(|j| {
                        E2M1_X2[(w[1 + j] & 15) as usize] as i32 * q[j] as i8 as i32
                            + E2M1_X2[(w[1 + j] >> 4) as usize] as i32 * q[j + 16] as i8 as i32
                    })
                    .sum();
                want += e8m0_half(w[0]) * xd[r * k / 32 + b] * s as f32;
            }
            assert!(
                (a[r] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{} {}",
                a[r],
                want
            );
        }
    }
}

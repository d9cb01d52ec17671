//! `y = x Wᵀ` with `W` held in its file's form (bf16, f16, f32 or GGUF blocks) and `x`, `y` in
//! f32. Weights are widened inside the kernel and products accumulate in f32, so the result is
//! the f32 product of the stored values, as transformers computes it, without a widened copy.
//!
//! - Few rows (decode): a GEMV kernel that widens each weight row in registers (AVX-512, or
//!   AVX2 with F16C and FMA, or portable code) and dots it with up to four rows of `x` at once.
//! - Many rows (prefill): tiles of [`ROW_TILE`] weight rows are widened into a reused per-thread
//!   scratch and multiplied with `gemm`.
//! - Quantized blocks: candle's block kernels, straight from the stored blocks.
//!
//! Every output column depends only on its weight row and on which of the two dense paths the
//! row count picks, and tiles start at multiples of [`ROW_TILE`]: a matrix computed in slices of
//! whole tiles gives bit-identical results to the whole matrix.

use candle_core::Tensor;
use rayon::prelude::*;

pub use super::common::ROW_TILE;
use super::common::{gemm_tiles, Out};
use crate::error::{Error, Result};
use crate::weights::mat::{Form, MatView};

/// Up to this many rows of `x` use the GEMV kernel; more use widened tiles and gemm. (The
/// fewest over the forms: it sizes the tiles' scratch.)
pub const GEMV_MAX_ROWS: usize = 8;

/// Rows up to which the GEMV kernel beats widened tiles for weights in `form`
/// (`examples/matmul_forms`, 5632×2048 on 2 AVX-512 cores): 16-bit weights read half the
/// bytes, so the kernel stays ahead to 16 rows (bf16 at 12 rows 6.7 against 10.6 ms, at 16
/// rows 10.4 against 13.7 ms); f32 weights are multiplied by gemm in place, which wins from 9
/// rows on (at 12 rows 8.5 against 11.1 ms).
pub fn gemv_max_rows(form: Form) -> usize {
    match form {
        Form::F16 | Form::BF16 => 16,
        _ => GEMV_MAX_ROWS,
    }
}

/// Rows of `x` up to which each row of a product with a matrix held in `form` has the bits
/// it has alone: below the switch to tiles, every kernel computes a row by itself in a fixed
/// order. Speculative verification scores several rows of one sequence and must reproduce
/// decoding them one at a time.
pub fn exact_rows(form: Form) -> usize {
    match form {
        Form::Q(t) => super::qmatmul::gemm_rows(t) - 1,
        Form::Mxfp4 { q8: true } => super::mxfp4::GEMM_ROWS - 1,
        f => gemv_max_rows(f),
    }
    .min(super::attention::ROW_EXACT)
}

/// Writes `x · wᵀ` into columns `col0 .. col0 + w.rows` of `y` (`[m, ldy]`, row-major).
/// `x` is `[m, w.cols]`, row-major.
pub fn matmul_into(
    x: &[f32],
    m: usize,
    w: MatView,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if x.len() < m * k
        || y.len() < m * ldy
        || col0 + n > ldy
        || w.data.len() < w.form.row_bytes(k) * n
    {
        return Err(Error::Internal(format!(
            "matmul of x [{m}, {k}] by a {n}×{k} {} matrix into columns {col0}.. of [{m}, {ldy}]",
            w.form.name()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    match w.form {
        Form::Q(t) => {
            super::qmatmul::quant_with(x, m, w, t, y, ldy, col0, m >= super::qmatmul::gemm_rows(t))
        }
        Form::Mxfp4 { q8: true } => {
            super::mxfp4::matmul_q8(x, m, w, y, ldy, col0, m >= super::mxfp4::GEMM_ROWS)
        }
        _ if m <= gemv_max_rows(w.form) => {
            gemv(x, m, w, y, ldy, col0);
            Ok(())
        }
        _ => {
            tiled(x, m, w, y, ldy, col0);
            Ok(())
        }
    }
}

/// `x Wᵀ` for a tensor `x` `[rows, in]` and a whole held matrix, as a new `[rows, out]` tensor.
pub fn mat_tensor(x: &Tensor, w: MatView) -> Result<Tensor> {
    with_rows(x, w.rows, |xs, m, y| matmul_into(xs, m, w, y, w.rows, 0))
}

/// Runs `f(x, rows, y)` on `x`'s f32 values, read in place, and an output of `rows × n`, which
/// it returns as a tensor.
pub fn with_rows(
    x: &Tensor,
    n: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]) -> Result<()>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(1).max(1);
    let m = x.elem_count() / k;
    let mut y = vec![0f32; m * n];
    {
        let (guard, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*guard else {
            return Err(Error::Invalid(
                "matrices are multiplied on the CPU only in this build".into(),
            ));
        };
        let off = layout.start_offset();
        let xs = &cpu.as_slice::<f32>()?[off..off + m * k];
        f(xs, m, &mut y)?;
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    Ok(Tensor::from_vec(y, dims, x.device())?)
}

fn gemv(x: &[f32], m: usize, w: MatView, y: &mut [f32], ldy: usize, col0: usize) {
    let (n, k) = (w.rows, w.cols);
    let rb = w.form.row_bytes(k);
    let out = Out(y.as_mut_ptr());
    // Enough tasks to balance the threads, few enough that scheduling costs nothing.
    let per = (n / (rayon::current_num_threads() * 8)).clamp(8, 256);
    let kernel = Kernel::get();
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut acc = [0f32; 4];
        // FP8 and MXFP4 rows are widened once (with their scales) and dotted as f32.
        let mut wide = match w.form {
            Form::F8(..) | Form::Mxfp4 { .. } => vec![0f32; k],
            _ => vec![],
        };
        for j in t * per..((t + 1) * per).min(n) {
            let mut row = &w.data[j * rb..(j + 1) * rb];
            let mut form = w.form;
            if let Form::F8(kind, block) = w.form {
                crate::weights::mat::widen_f8(kind, block, k, row, &mut wide);
                row = bytemuck::cast_slice(&wide);
                form = Form::F32;
            } else if let Form::Mxfp4 { .. } = w.form {
                crate::weights::mat::widen_mxfp4(row, &mut wide);
                row = bytemuck::cast_slice(&wide);
                form = Form::F32;
            }
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(4);
                kernel.dot(form, row, &x[i * k..(i + nx) * k], k, nx, &mut acc);
                for (r, a) in acc[..nx].iter().enumerate() {
                    // SAFETY: in bounds (checked by the caller); column col0 + j belongs to
                    // this task alone.
                    unsafe { *out.at((i + r) * ldy + col0 + j) = *a };
                }
                i += nx;
            }
        }
    });
}

fn tiled(x: &[f32], m: usize, w: MatView, y: &mut [f32], ldy: usize, col0: usize) {
    let (n, k) = (w.rows, w.cols);
    let rb = w.form.row_bytes(k);
    let data = &w.data[..rb * n];
    // f32 rows are multiplied where they lie; 16-bit rows are widened into scratch first.
    let direct = (w.form == Form::F32 && (data.as_ptr() as usize).is_multiple_of(4))
        .then(|| bytemuck::cast_slice::<u8, f32>(data));
    gemm_tiles(x, m, n, k, y, ldy, col0, direct, |r, dst| {
        widen(w.form, &data[r * rb..(r + 1) * rb], dst)
    });
}

/// Widens one stored row to f32.
fn widen(form: Form, row: &[u8], dst: &mut [f32]) {
    match form {
        Form::F32 => {
            for (d, c) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Form::BF16 => {
            for (d, c) in dst.iter_mut().zip(row.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Form::F16 => {
            let mut tmp = [0u16; 256];
            for (d, c) in dst.chunks_mut(256).zip(row.chunks(512)) {
                for (t, b) in tmp.iter_mut().zip(c.chunks_exact(2)) {
                    *t = u16::from_le_bytes([b[0], b[1]]);
                }
                let h: &[half::f16] = bytemuck::cast_slice(&tmp[..d.len()]);
                // The slice conversion uses F16C where the CPU has it.
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, d);
            }
        }
        Form::F8(kind, block) => {
            let cols = dst.len();
            crate::weights::mat::widen_f8(kind, block, cols, row, dst)
        }
        Form::Mxfp4 { .. } => crate::weights::mat::widen_mxfp4(row, dst),
        Form::Q(_) => unreachable!("quantized rows take the block kernels"),
    }
}

/// The dot-product kernel this CPU runs, picked once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    pub fn get() -> Kernel {
        static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            if std::env::var_os("AIRLLM_PORTABLE_KERNEL").is_some() {
                return Kernel::Portable;
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Kernel::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    return Kernel::Avx2;
                }
            }
            Kernel::Portable
        })
    }

    /// `acc[r] = row · x[r]` for the `nx` (1 to 4) rows of `x` (`[nx, k]`).
    fn dot(self, form: Form, row: &[u8], x: &[f32], k: usize, nx: usize, acc: &mut [f32; 4]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was picked because the CPU has these features; lengths are
            // checked by the callers (row has k values, x has nx rows of k).
            Kernel::Avx512 => unsafe { x86::dot_avx512(form, row, x, k, nx, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => unsafe { x86::dot_avx2(form, row, x, k, nx, acc) },
            _ => portable::dot(form, row, x, k, nx, acc),
        }
    }
}

/// Stored value `i` of a row, widened.
#[inline(always)]
fn elem(form: Form, row: &[u8], i: usize) -> f32 {
    match form {
        Form::F32 => {
            f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
        }
        Form::F16 => half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        _ => f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16),
    }
}

mod portable {
    use super::*;

    /// Widens a block of the row into a small buffer, then dots it with each row of `x` with
    /// eight partial sums, which the compiler vectorises for the target (NEON, SSE2, ...).
    pub fn dot(form: Form, row: &[u8], x: &[f32], k: usize, nx: usize, acc: &mut [f32; 4]) {
        const B: usize = 256;
        let es = if form == Form::F32 { 4 } else { 2 };
        let mut w = [0f32; B];
        let mut s = [[0f32; 8]; 4];
        let mut i = 0;
        while i < k {
            let c = B.min(k - i);
            widen(form, &row[i * es..(i + c) * es], &mut w[..c]);
            for (r, sr) in s.iter_mut().enumerate().take(nx) {
                let xr = &x[r * k + i..r * k + i + c];
                let mut wc = w[..c].chunks_exact(8);
                let mut xc = xr.chunks_exact(8);
                for (wv, xv) in (&mut wc).zip(&mut xc) {
                    for l in 0..8 {
                        sr[l] += wv[l] * xv[l];
                    }
                }
                for (l, (a, b)) in wc.remainder().iter().zip(xc.remainder()).enumerate() {
                    sr[l] += a * b;
                }
            }
            i += c;
        }
        for r in 0..nx {
            acc[r] = s[r].iter().sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::kernels::common::hsum;
    use std::arch::x86_64::*;

    /// Values ahead of the current one whose cache line is prefetched.
    const PREFETCH: usize = 512;

    #[target_feature(enable = "avx512f")]
    unsafe fn load16(form: Form, p: *const u8) -> __m512 {
        match form {
            Form::F32 => _mm512_loadu_ps(p as *const f32),
            Form::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            ))),
        }
    }

    /// Picks the instance for `nx` rows of `x`: with the row count a constant, the
    /// accumulators stay in registers.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(
        form: Form,
        row: &[u8],
        x: &[f32],
        k: usize,
        nx: usize,
        acc: &mut [f32; 4],
    ) {
        match nx {
            1 => dot512::<1>(form, row, x, k, acc),
            2 => dot512::<2>(form, row, x, k, acc),
            3 => dot512::<3>(form, row, x, k, acc),
            _ => dot512::<4>(form, row, x, k, acc),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot512<const NX: usize>(
        form: Form,
        row: &[u8],
        x: &[f32],
        k: usize,
        acc: &mut [f32; 4],
    ) {
        let nx = NX;
        let es = if form == Form::F32 { 4 } else { 2 };
        let wp = row.as_ptr();
        let xp = x.as_ptr();
        // Two accumulators per row of x hide the FMA latency.
        let mut a = [_mm512_setzero_ps(); 8];
        let full = k / 32 * 32;
        let mut i = 0;
        while i < full {
            // The weights stream from memory once; ask for them ahead (rows are contiguous,
            // so this runs into the next row).
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + PREFETCH) * es) as *const i8);
            let w0 = load16(form, wp.add(i * es));
            let w1 = load16(form, wp.add((i + 16) * es));
            for r in 0..nx {
                let xr = xp.add(r * k + i);
                a[2 * r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[2 * r]);
                a[2 * r + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), a[2 * r + 1]);
            }
            i += 32;
        }
        for r in 0..nx {
            let mut t = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * r], a[2 * r + 1]));
            for j in full..k {
                t += elem(form, row, j) * x[r * k + j];
            }
            acc[r] = t;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(form: Form, p: *const u8) -> __m256 {
        match form {
            Form::F32 => _mm256_loadu_ps(p as *const f32),
            Form::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p as *const __m128i),
            ))),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(
        form: Form,
        row: &[u8],
        x: &[f32],
        k: usize,
        nx: usize,
        acc: &mut [f32; 4],
    ) {
        match nx {
            1 => dot256::<1>(form, row, x, k, acc),
            2 => dot256::<2>(form, row, x, k, acc),
            3 => dot256::<3>(form, row, x, k, acc),
            _ => dot256::<4>(form, row, x, k, acc),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot256<const NX: usize>(
        form: Form,
        row: &[u8],
        x: &[f32],
        k: usize,
        acc: &mut [f32; 4],
    ) {
        let nx = NX;
        let es = if form == Form::F32 { 4 } else { 2 };
        let wp = row.as_ptr();
        let xp = x.as_ptr();
        let mut a = [_mm256_setzero_ps(); 8];
        let full = k / 16 * 16;
        let mut i = 0;
        while i < full {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + PREFETCH) * es) as *const i8);
            let w0 = load8(form, wp.add(i * es));
            let w1 = load8(form, wp.add((i + 8) * es));
            for r in 0..nx {
                let xr = xp.add(r * k + i);
                a[2 * r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a[2 * r]);
                a[2 * r + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a[2 * r + 1]);
            }
            i += 16;
        }
        for r in 0..nx {
            let mut t = hsum(_mm256_add_ps(a[2 * r], a[2 * r + 1]));
            for j in full..k {
                t += elem(form, row, j) * x[r * k + j];
            }
            acc[r] = t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(form: Form, v: &[f32]) -> Vec<u8> {
        match form {
            Form::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Form::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Form::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            Form::Q(_) | Form::F8(..) | Form::Mxfp4 { .. } => unreachable!(),
        }
    }

    fn reference(form: Form, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f64> {
        let rb = form.row_bytes(k);
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * elem(form, &w[j * rb..], l) as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn every_path_matches_f64_and_slices_are_bit_identical() {
        let (n, k) = (3 * ROW_TILE + 5, 77);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        for form in [Form::F32, Form::F16, Form::BF16] {
            let w = bytes(form, &wv);
            let g = gemv_max_rows(form);
            for m in [1, 3, 5, g, g + 3] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
                    .collect();
                let want = reference(form, &x, &w, m, n, k);
                let view = MatView {
                    form,
                    rows: n,
                    cols: k,
                    data: &w,
                };
                let mut whole = vec![0f32; m * n];
                matmul_into(&x, m, view, &mut whole, n, 0).unwrap();
                for (a, b) in whole.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-3, "{form:?} m={m}: {a} vs {b}");
                }
                // In slices of one tile and of two tiles plus the rest.
                let rb = form.row_bytes(k);
                let mut sliced = vec![0f32; m * n];
                for (s, len) in [(0, ROW_TILE), (ROW_TILE, 2 * ROW_TILE), (3 * ROW_TILE, 5)] {
                    let v = MatView {
                        form,
                        rows: len,
                        cols: k,
                        data: &w[s * rb..(s + len) * rb],
                    };
                    matmul_into(&x, m, v, &mut sliced, n, s).unwrap();
                }
                assert_eq!(whole, sliced, "{form:?} m={m}");
                // Up to the GEMV limit a row has the bits it has alone (speculative
                // verification relies on it).
                if m <= g {
                    for i in 0..m {
                        let mut alone = vec![0f32; n];
                        matmul_into(&x[i * k..(i + 1) * k], 1, view, &mut alone, n, 0).unwrap();
                        assert_eq!(&whole[i * n..(i + 1) * n], &alone[..], "{form:?} m={m}");
                    }
                }
            }
        }
    }

    /// FP8 rows with block scales: every path against the f64 product of the widened values
    /// (the table and the scale), and slices bit-identical to the whole, with a partial last
    /// column block.
    #[test]
    fn fp8_rows_widen_with_their_block_scales() {
        use crate::weights::mat::F8Kind;
        let t = F8Kind::E4M3.table();
        assert_eq!(
            (t[0x7E], t[0x08], t[0x01], t[0xC0]),
            (448.0, 0.015625, 0.001953125, -2.0)
        );
        assert!(t[0x7F].is_nan());
        assert_eq!(F8Kind::E5M2.table()[0x3C], 1.0);
        let (n, k, block) = (3 * ROW_TILE + 5, 77, 32);
        for kind in [F8Kind::E4M3, F8Kind::E5M2] {
            let form = Form::F8(kind, block);
            let rb = form.row_bytes(k);
            let mut w = vec![0u8; n * rb];
            for (j, row) in w.chunks_mut(rb).enumerate() {
                for (l, b) in row[..k].iter_mut().enumerate() {
                    // Finite values of both formats: below 0x7C in magnitude.
                    *b = ((j * 31 + l * 17) % 0x7C) as u8 | if (j + l) % 3 == 0 { 0x80 } else { 0 };
                }
                for (c, sc) in row[k.next_multiple_of(4)..].chunks_mut(4).enumerate() {
                    sc.copy_from_slice(&(0.01 * (1 + j % 5 + c) as f32).to_le_bytes());
                }
            }
            let view = MatView {
                form,
                rows: n,
                cols: k,
                data: &w,
            };
            let wide = view.to_f32().unwrap();
            for m in [1, 3, 12] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
                    .collect();
                let mut whole = vec![0f32; m * n];
                matmul_into(&x, m, view, &mut whole, n, 0).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| x[i * k + l] as f64 * wide[j * k + l] as f64)
                            .sum();
                        let got = whole[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-3 * want.abs().max(1.0),
                            "{kind:?} m={m}: {got} vs {want}"
                        );
                    }
                }
                let mut sliced = vec![0f32; m * n];
                for (s, len) in [(0, ROW_TILE), (ROW_TILE, 2 * ROW_TILE + 5)] {
                    let v = MatView {
                        form,
                        rows: len,
                        cols: k,
                        data: &w[s * rb..(s + len) * rb],
                    };
                    matmul_into(&x, m, v, &mut sliced, n, s).unwrap();
                }
                assert_eq!(whole, sliced, "{kind:?} m={m}");
            }
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_portable_one() {
        let k = 1000;
        let row: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
        let x: Vec<f32> = (0..4 * k).map(|i| (i as f32 * 0.3).cos()).collect();
        for form in [Form::F32, Form::F16, Form::BF16] {
            let w = bytes(form, &row);
            let mut want = [0f32; 4];
            portable::dot(form, &w, &x, k, 4, &mut want);
            let mut got = [0f32; 4];
            Kernel::get().dot(form, &w, &x, k, 4, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{form:?}: {a} vs {b}");
            }
        }
    }
}

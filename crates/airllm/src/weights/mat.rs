//! Matrices held in the file's form: bf16, f16 and f32 rows as stored, quantized GGUF rows as
//! their blocks. Nothing is widened in memory; the matmul widens inside its kernel.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// The element form of a held matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    F32,
    F16,
    BF16,
    /// GGUF blocks of a quantized type.
    Q(GgmlDType),
    /// FP8 with block scales, one byte a weight: each row is its `cols` bytes (padded to 4),
    /// then one f32 scale per `block` columns, its block row's, copied in when it is read.
    F8(F8Kind, usize),
    /// MXFP4 (OCP microscaling FP4): blocks of 32 e2m1 values sharing one e8m0 scale, in
    /// GGUF's layout of 17 bytes a block (the scale byte, then 16 bytes whose low nibbles are
    /// values 0..16 and high nibbles values 16..32). Checkpoints in transformers' layout are
    /// repacked to it when read. `q8`: products in llama.cpp's arithmetic (activations
    /// quantized to Q8_0, as for GGUF files); otherwise the f32 products of the exact values,
    /// as transformers computes them.
    Mxfp4 {
        q8: bool,
    },
}

/// Values of the 16 e2m1 codes, doubled so that they are integers (llama.cpp's table).
pub const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Bytes of one MXFP4 block of 32 values.
pub const MXFP4_BLOCK_BYTES: usize = 17;

/// Half the value of an e8m0 scale byte, 2^(e − 128), exactly (subnormal for e < 2): the
/// factor of the doubled table [`E2M1_X2`].
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(((e as u32) - 1) << 23)
    }
}

/// Widens one MXFP4 block (17 bytes) to its 32 values.
#[inline]
pub fn widen_mxfp4_block(b: &[u8], dst: &mut [f32]) {
    let s = e8m0_half(b[0]);
    for j in 0..16 {
        let q = b[1 + j];
        dst[j] = E2M1_X2[(q & 15) as usize] as f32 * s;
        dst[j + 16] = E2M1_X2[(q >> 4) as usize] as f32 * s;
    }
}

/// Widens a row of MXFP4 blocks.
pub fn widen_mxfp4(row: &[u8], dst: &mut [f32]) {
    for (d, b) in dst
        .chunks_exact_mut(32)
        .zip(row.chunks_exact(MXFP4_BLOCK_BYTES))
    {
        widen_mxfp4_block(b, d);
    }
}

/// MXFP4 blocks of `v` (whole blocks of 32), by OCP's rule: each block's scale is the least
/// power of two that brings its largest magnitude within ±6, and each value takes its nearest
/// e2m1 code (the lower magnitude on a tie). Values already on that grid (as from MXFP4) come
/// back exactly.
pub fn quantize_mxfp4(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() / 32 * MXFP4_BLOCK_BYTES);
    const MAGS: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for b in v.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let e = if amax > 0.0 {
            ((amax / 6.0).log2().ceil() as i32).clamp(-127, 127)
        } else {
            -127
        };
        // Exactly 2^-e (as two factors: 2^127 alone overflows f32's normal range).
        let inv = (-(e as f32) / 2.0).exp2() * (-(e as f32) / 2.0).exp2();
        let code = |x: f32| -> u8 {
            let a = (x * inv).abs();
            let mut best = 0;
            for (i, m) in MAGS.iter().enumerate() {
                if (a - m).abs() < (a - MAGS[best]).abs() {
                    best = i;
                }
            }
            best as u8 | if x < 0.0 && best > 0 { 8 } else { 0 }
        };
        out.push((e + 127) as u8);
        for j in 0..16 {
            out.push(code(b[j]) | (code(b[j + 16]) << 4));
        }
    }
    out
}

/// Repacks rows of MXFP4 from transformers' layout (per row, `cols / 2` bytes whose low
/// nibble is the even value and high nibble the odd one, and `cols / 32` scale bytes
/// elsewhere) into [`Form::Mxfp4`]'s blocks.
pub fn repack_hf_mxfp4(blocks: &[u8], scales: &[u8], dst: &mut [u8]) {
    for ((d, b), &e) in dst
        .chunks_exact_mut(MXFP4_BLOCK_BYTES)
        .zip(blocks.chunks_exact(16))
        .zip(scales)
    {
        d[0] = e;
        let nib = |i: usize| (b[i / 2] >> (4 * (i % 2))) & 15;
        for j in 0..16 {
            d[1 + j] = nib(j) | (nib(j + 16) << 4);
        }
    }
}

/// The two FP8 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F8Kind {
    /// float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no infinities.
    E4M3,
    /// float8_e5m2: the top byte of an f16.
    E5M2,
}

impl F8Kind {
    /// The value of each byte, widened once.
    pub fn table(self) -> &'static [f32; 256] {
        static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        match self {
            F8Kind::E4M3 => E4M3.get_or_init(|| {
                std::array::from_fn(|b| {
                    let (e, m) = ((b >> 3) & 0xF, b & 7);
                    let v = if e == 15 && m == 7 {
                        f32::NAN
                    } else if e == 0 {
                        m as f32 / 8.0 * (-6f32).exp2()
                    } else {
                        (1.0 + m as f32 / 8.0) * (e as f32 - 7.0).exp2()
                    };
                    if b & 0x80 != 0 {
                        -v
                    } else {
                        v
                    }
                })
            }),
            F8Kind::E5M2 => E5M2.get_or_init(|| {
                std::array::from_fn(|b| half::f16::from_bits((b as u16) << 8).to_f32())
            }),
        }
    }
}

/// Widens one FP8 row (its bytes and scales, as [`Form::F8`] lays them out) to f32: each
/// value times its block's scale, exactly as the byte table gives it (see [`widen_f8_block`]).
pub fn widen_f8(kind: F8Kind, block: usize, cols: usize, row: &[u8], dst: &mut [f32]) {
    let scales = &row[cols.next_multiple_of(4)..];
    for (j, (d, b)) in dst[..cols]
        .chunks_mut(block)
        .zip(row[..cols].chunks(block))
        .enumerate()
    {
        let s = f32::from_le_bytes([
            scales[4 * j],
            scales[4 * j + 1],
            scales[4 * j + 2],
            scales[4 * j + 3],
        ]);
        widen_f8_block(kind, b, s, d);
    }
}

/// `dst[i] = value(src[i]) · s`. On x86 with F16C, eight at a time: an e5m2 byte is the top
/// byte of an f16, and an e4m3 byte's bits, moved into an f16's exponent and mantissa, give
/// its value / 256 (normal and subnormal alike, since f16's exponent bias is 8 more), so the
/// scale is taken × 256. Both products are of the same real number, so they round to the
/// table's result; only e4m3's NaN byte (0x7f) widens to a finite value on that path.
pub fn widen_f8_block(kind: F8Kind, src: &[u8], s: f32, dst: &mut [f32]) {
    let n = dst.len().min(src.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ok = *F16C.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
        });
        if ok {
            // SAFETY: the CPU has AVX2 and F16C; `n` is within both slices.
            done = unsafe { widen_f8_f16c(kind, &src[..n], s, &mut dst[..n]) };
        }
    }
    let t = kind.table();
    for (d, &b) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = t[b as usize] * s;
    }
}

/// The F16C path of [`widen_f8_block`] over whole groups of eight; returns the values done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f8_f16c(kind: F8Kind, src: &[u8], s: f32, dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    let e4m3 = kind == F8Kind::E4M3;
    let sv = _mm256_set1_ps(if e4m3 { s * 256.0 } else { s });
    let (low, sign) = (_mm_set1_epi16(0x7f), _mm_set1_epi16(0x80));
    let mut i = 0;
    while i < n {
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(src.as_ptr().add(i) as *const __m128i));
        let h = if e4m3 {
            _mm_or_si128(
                _mm_slli_epi16(_mm_and_si128(b, low), 7),
                _mm_slli_epi16(_mm_and_si128(b, sign), 8),
            )
        } else {
            _mm_slli_epi16(b, 8)
        };
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(i),
            _mm256_mul_ps(_mm256_cvtph_ps(h), sv),
        );
        i += 8;
    }
    n
}

impl Form {
    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Form::F32 => 4 * cols,
            Form::F16 | Form::BF16 => 2 * cols,
            Form::Q(t) => cols / t.block_size() * t.type_size(),
            Form::F8(_, block) => cols.next_multiple_of(4) + 4 * cols.div_ceil(block),
            Form::Mxfp4 { .. } => cols / 32 * MXFP4_BLOCK_BYTES,
        }
    }
    /// Values per storage block (1 for the float forms).
    pub fn block_size(self) -> usize {
        match self {
            Form::Q(t) => t.block_size(),
            Form::Mxfp4 { .. } => 32,
            _ => 1,
        }
    }
    /// Whether values are stored in blocks that share a scale (GGUF's quantized types).
    pub fn is_quantized(self) -> bool {
        matches!(self, Form::Q(_) | Form::Mxfp4 { .. } | Form::F8(..))
    }
    /// The form of GGUF type id `id`, for the types this engine computes with.
    pub fn of_gguf_id(id: u32) -> Option<Form> {
        if id == MXFP4_GGUF_ID {
            return Some(Form::Mxfp4 { q8: true });
        }
        ggml_type(id).map(|(t, _)| Form::of_ggml(t))
    }
    /// The GGUF type id of this form (none for FP8, which GGUF does not have).
    pub fn gguf_id(self) -> Option<u32> {
        match self {
            Form::Mxfp4 { .. } => Some(MXFP4_GGUF_ID),
            Form::F8(..) => None,
            f => (0..31).find(|&id| ggml_type(id).is_some_and(|(d, _)| Form::of_ggml(d) == f)),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Form::F32 => "F32",
            Form::F16 => "F16",
            Form::BF16 => "BF16",
            Form::Q(t) => type_name(t),
            Form::F8(F8Kind::E4M3, _) => "F8_E4M3",
            Form::F8(F8Kind::E5M2, _) => "F8_E5M2",
            Form::Mxfp4 { .. } => "MXFP4",
        }
    }
    /// The form of a GGUF tensor type.
    pub fn of_ggml(t: GgmlDType) -> Form {
        match t {
            GgmlDType::F32 => Form::F32,
            GgmlDType::F16 => Form::F16,
            GgmlDType::BF16 => Form::BF16,
            q => Form::Q(q),
        }
    }
}

/// GGML type ids we can compute with, and their names for messages.
pub fn ggml_type(id: u32) -> Option<(GgmlDType, &'static str)> {
    Some(match id {
        0 => (GgmlDType::F32, "F32"),
        1 => (GgmlDType::F16, "F16"),
        2 => (GgmlDType::Q4_0, "Q4_0"),
        3 => (GgmlDType::Q4_1, "Q4_1"),
        6 => (GgmlDType::Q5_0, "Q5_0"),
        7 => (GgmlDType::Q5_1, "Q5_1"),
        8 => (GgmlDType::Q8_0, "Q8_0"),
        10 => (GgmlDType::Q2K, "Q2_K"),
        11 => (GgmlDType::Q3K, "Q3_K"),
        12 => (GgmlDType::Q4K, "Q4_K"),
        13 => (GgmlDType::Q5K, "Q5_K"),
        14 => (GgmlDType::Q6K, "Q6_K"),
        30 => (GgmlDType::BF16, "BF16"),
        _ => return None,
    })
}

pub fn type_name(t: GgmlDType) -> &'static str {
    (0..31)
        .filter_map(ggml_type)
        .find(|(d, _)| *d == t)
        .map_or("?", |(_, n)| n)
}

/// GGML's type id of MXFP4 (which candle does not have).
pub const MXFP4_GGUF_ID: u32 = 39;

pub use super::buf::{set_host_pinning, AlignedBuf, HostPin, BUF_ALIGN};

/// Rows of a matrix in their held form, borrowed.
#[derive(Clone, Copy)]
pub struct MatView<'a> {
    pub form: Form,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl MatView<'_> {
    /// The rows widened to f32 (for the converter; the engine never widens a whole matrix).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let n = self.rows * self.cols;
        let d = self.data;
        Ok(match self.form {
            Form::F32 => d[..4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Form::F16 => d[..2 * n]
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Form::BF16 => d[..2 * n]
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Form::F8(kind, block) => {
                let rb = self.form.row_bytes(self.cols);
                let mut out = vec![0f32; n];
                for (r, dst) in out.chunks_mut(self.cols.max(1)).enumerate() {
                    widen_f8(kind, block, self.cols, &d[r * rb..(r + 1) * rb], dst);
                }
                out
            }
            Form::Mxfp4 { .. } => {
                let rb = self.form.row_bytes(self.cols);
                let mut out = vec![0f32; n];
                for (r, dst) in out.chunks_mut(self.cols.max(1)).enumerate() {
                    widen_mxfp4(&d[r * rb..(r + 1) * rb], dst);
                }
                out
            }
            Form::Q(t) => {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    t,
                    &d[..self.form.row_bytes(self.cols) * self.rows],
                    vec![self.rows, self.cols],
                    &candle_core::Device::Cpu,
                )?;
                q.dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1()?
            }
        })
    }
}

/// A whole matrix (or a range of its rows) held in memory in its file's form.
pub struct Mat {
    pub form: Form,
    pub rows: usize,
    pub cols: usize,
    buf: AlignedBuf,
    /// Where the first row starts in `buf` (O_DIRECT reads start at an aligned offset).
    off: usize,
}

impl Mat {
    pub fn new(form: Form, rows: usize, cols: usize, buf: AlignedBuf, off: usize) -> Result<Self> {
        let need = off + form.row_bytes(cols) * rows;
        if need > buf.capacity() {
            return Err(Error::Internal(format!(
                "a {rows}×{cols} {} matrix needs {need} bytes, its buffer has {}",
                form.name(),
                buf.capacity()
            )));
        }
        Ok(Mat {
            form,
            rows,
            cols,
            buf,
            off,
        })
    }
    pub fn view(&self) -> MatView<'_> {
        let n = self.form.row_bytes(self.cols) * self.rows;
        MatView {
            form: self.form,
            rows: self.rows,
            cols: self.cols,
            data: &self.buf.bytes(self.off + n)[self.off..],
        }
    }
    /// Bytes held (the buffer, alignment slack included).
    pub fn bytes(&self) -> u64 {
        self.buf.capacity() as u64
    }
    /// The same matrix in a buffer of its own exact size, when its buffer is larger (an f32 read
    /// narrowed to f16 in place leaves half of it unused).
    pub fn compact(self) -> Mat {
        let n = self.form.row_bytes(self.cols) * self.rows;
        if self.buf.capacity() <= n + 2 * BUF_ALIGN {
            return self;
        }
        let mut buf = AlignedBuf::with_capacity(n);
        buf.bytes_mut(n)
            .copy_from_slice(&self.buf.bytes(self.off + n)[self.off..]);
        Mat {
            buf,
            off: 0,
            ..self
        }
    }

    /// Gives the buffer back (to a pool).
    pub fn into_buf(self) -> AlignedBuf {
        self.buf
    }
}

#[cfg(test)]
mod f8_tests {
    use super::*;

    /// MXFP4 values quantize back to themselves, at every scale and code.
    #[test]
    fn mxfp4_values_round_trip() {
        let mut blocks = vec![];
        for (k, e) in [90u8, 110, 120, 127, 140, 160].into_iter().enumerate() {
            blocks.push(e);
            blocks.extend((0..16).map(|j| ((j * 7 + k) % 256) as u8));
        }
        let mut wide = vec![0f32; blocks.len() / 17 * 32];
        widen_mxfp4(&blocks, &mut wide);
        let back = quantize_mxfp4(&wide);
        let mut again = vec![0f32; wide.len()];
        widen_mxfp4(&back, &mut again);
        // Equal as numbers (−0 may come back as +0).
        assert_eq!(wide, again);
    }

    /// Every byte but e4m3's NaN, at several scales, widens to the table's value times the
    /// scale, bit for bit, on whichever path this CPU takes.
    #[test]
    fn the_fast_widening_is_the_table_bit_for_bit() {
        for kind in [F8Kind::E4M3, F8Kind::E5M2] {
            let t = kind.table();
            let bytes: Vec<u8> = (0..=255u8)
                .filter(|&b| kind == F8Kind::E5M2 || b & 0x7f != 0x7f)
                .collect();
            for s in [1.0f32, 3.7e-3, 0.125, 1.9e-7, 41.5] {
                let mut d = vec![0f32; bytes.len()];
                widen_f8_block(kind, &bytes, s, &mut d);
                for (&b, &v) in bytes.iter().zip(&d) {
                    let want = t[b as usize] * s;
                    assert!(
                        v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                        "{kind:?} byte {b:#04x} scale {s}: {v} against {want}"
                    );
                }
            }
        }
    }
}

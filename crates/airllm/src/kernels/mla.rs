//! The absorbed products of DeepSeek's multi-head latent attention. `kv_b_proj` maps a
//! token's latent `c` (`rank` values) to each head's key part (`nope` rows) and value
//! (`v_dim` rows). Instead of expanding every cached latent, the key rows are folded into
//! the query (`q_lat = W_UKᵀ q_nope`, a product by `W`, not `Wᵀ`) and the value rows are
//! applied to the attention output in the latent space afterwards. Both read `kv_b_proj`
//! as it arrives, in its file's form: key rows are widened a few at a time, value rows are
//! kept as stored for the second product.

use super::common::gemm1;
use crate::error::{Error, Result};
use crate::weights::mat::{AlignedBuf, Form, MatView};

/// Rows widened at once.
const CHUNK: usize = 64;

/// The shape of one layer's latent attention.
#[derive(Debug, Clone, Copy)]
pub struct Latent {
    pub heads: usize,
    pub nope: usize,
    pub v_dim: usize,
    pub rank: usize,
}

/// The value rows of `kv_b_proj` (`heads · v_dim` rows of `rank`), gathered in their stored
/// form while its key rows are absorbed.
pub struct ValueRows {
    form: Option<Form>,
    buf: AlignedBuf,
    row_bytes: usize,
    rows: usize,
}

impl ValueRows {
    pub fn new() -> Self {
        ValueRows {
            form: None,
            buf: AlignedBuf::default(),
            row_bytes: 0,
            rows: 0,
        }
    }

    /// Head `h`'s `v_dim` value rows.
    pub fn head(&self, s: Latent, h: usize) -> Result<MatView<'_>> {
        let form = self
            .form
            .ok_or_else(|| Error::Internal("kv_b_proj's value rows were never read".into()))?;
        if self.rows != s.heads * s.v_dim {
            return Err(Error::Internal(format!(
                "{} of kv_b_proj's {} value rows were read",
                self.rows,
                s.heads * s.v_dim
            )));
        }
        let n = s.v_dim * self.row_bytes;
        Ok(MatView {
            form,
            rows: s.v_dim,
            cols: s.rank,
            data: &self.buf.bytes(self.rows * self.row_bytes)[h * n..(h + 1) * n],
        })
    }
}

impl Default for ValueRows {
    fn default() -> Self {
        Self::new()
    }
}

/// Folds rows `start ..` of `kv_b_proj` (the slice `w`) into the latent queries and keeps its
/// value rows. `q_nope` is `[t, heads, nope]`, `q_lat` `[t, heads, rank]` (accumulated).
pub fn absorb(
    s: Latent,
    start: usize,
    w: MatView,
    q_nope: &[f32],
    t: usize,
    q_lat: &mut [f32],
    values: &mut ValueRows,
) -> Result<()> {
    let per_head = s.nope + s.v_dim;
    if w.cols != s.rank
        || start + w.rows > s.heads * per_head
        || q_nope.len() < t * s.heads * s.nope
        || q_lat.len() < t * s.heads * s.rank
    {
        return Err(Error::Internal(format!(
            "kv_b_proj rows {start}..{} of {} columns do not fit latent attention of {} heads × ({} + {}) rows × {}",
            start + w.rows,
            w.cols,
            s.heads,
            s.nope,
            s.v_dim,
            s.rank
        )));
    }
    let rb = w.form.row_bytes(w.cols);
    if values.form.is_none() {
        values.form = Some(w.form);
        values.row_bytes = rb;
        values.buf.ensure(s.heads * s.v_dim * rb);
    }
    let mut wide = vec![0f32; CHUNK * s.rank];
    let mut r = 0;
    while r < w.rows {
        let g = start + r;
        let (h, j) = (g / per_head, g % per_head);
        if j >= s.nope {
            // Value rows: kept as stored, in head order.
            let n = (per_head - j).min(w.rows - r);
            let at = (h * s.v_dim + j - s.nope) * rb;
            values.buf.bytes_mut(s.heads * s.v_dim * rb)[at..at + n * rb]
                .copy_from_slice(&w.data[r * rb..(r + n) * rb]);
            values.rows += n;
            r += n;
            continue;
        }
        // Key rows j .. j + n of head h: q_lat[:, h] += q_nope[:, h, j..j + n] · W[rows].
        let n = (s.nope - j).min(w.rows - r).min(CHUNK);
        let sub = MatView {
            form: w.form,
            rows: n,
            cols: w.cols,
            data: &w.data[r * rb..(r + n) * rb],
        };
        let v = sub.to_f32()?;
        wide[..n * s.rank].copy_from_slice(&v);
        // SAFETY: q_lat's head h of row i is at (i · heads + h) · rank, `rank` values, for
        // i < t; q_nope's is at (i · heads + h) · nope + j, `n` values; `wide` is [n, rank].
        unsafe {
            gemm1(
                t,
                s.rank,
                n,
                q_lat.as_mut_ptr().add(h * s.rank),
                s.heads * s.rank,
                true,
                q_nope.as_ptr().add(h * s.nope + j),
                s.heads * s.nope,
                wide.as_ptr(),
                s.rank,
                1,
            )
        };
        r += n;
    }
    Ok(())
}

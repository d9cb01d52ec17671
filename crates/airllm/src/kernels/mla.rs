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

/// Rows of a latent-attention matrix gathered in their stored form as they arrive: the value
/// rows of `kv_b_proj` while its key rows are absorbed, or all of `attn_k_b` / `attn_v_b`.
pub struct ValueRows {
    form: Option<Form>,
    buf: AlignedBuf,
    row_bytes: usize,
    /// Rows the store is sized for, and rows put so far.
    total: usize,
    rows: usize,
}

impl ValueRows {
    pub fn new() -> Self {
        ValueRows {
            form: None,
            buf: AlignedBuf::default(),
            row_bytes: 0,
            total: 0,
            rows: 0,
        }
    }

    /// Copies the slice `w` to rows `at ..` of a store of `total` rows.
    pub fn put(&mut self, at: usize, total: usize, w: MatView) -> Result<()> {
        let rb = w.form.row_bytes(w.cols);
        match self.form {
            None => {
                self.form = Some(w.form);
                self.row_bytes = rb;
                self.total = total;
                self.buf.ensure(total * rb);
            }
            Some(f) if f != w.form || rb != self.row_bytes || total != self.total => {
                return Err(Error::Internal(
                    "latent attention rows of mixed forms or shapes".into(),
                ))
            }
            Some(_) => {}
        }
        if at + w.rows > total {
            return Err(Error::Internal(format!(
                "rows {at}..{} outside the {total} of a latent attention matrix",
                at + w.rows
            )));
        }
        self.buf.bytes_mut(total * rb)[at * rb..(at + w.rows) * rb]
            .copy_from_slice(&w.data[..w.rows * rb]);
        self.rows += w.rows;
        Ok(())
    }

    /// Rows `start .. start + n` of `cols` columns, once all rows are in.
    pub fn view(&self, start: usize, n: usize, cols: usize) -> Result<MatView<'_>> {
        let form = self
            .form
            .ok_or_else(|| Error::Internal("latent attention rows were never read".into()))?;
        if self.rows != self.total || start + n > self.total {
            return Err(Error::Internal(format!(
                "{} of {} latent attention rows were read; rows {start}..{} asked for",
                self.rows,
                self.total,
                start + n
            )));
        }
        let rb = self.row_bytes;
        Ok(MatView {
            form,
            rows: n,
            cols,
            data: &self.buf.bytes(self.total * rb)[start * rb..(start + n) * rb],
        })
    }

    /// Head `h`'s `v_dim` value rows.
    pub fn head(&self, s: Latent, h: usize) -> Result<MatView<'_>> {
        self.view(h * s.v_dim, s.v_dim, s.rank)
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
    let mut wide = vec![0f32; CHUNK * s.rank];
    let mut r = 0;
    while r < w.rows {
        let g = start + r;
        let (h, j) = (g / per_head, g % per_head);
        if j >= s.nope {
            // Value rows: kept as stored, in head order.
            let n = (per_head - j).min(w.rows - r);
            let sub = MatView {
                form: w.form,
                rows: n,
                cols: w.cols,
                data: &w.data[r * rb..(r + n) * rb],
            };
            values.put(h * s.v_dim + j - s.nope, s.heads * s.v_dim, sub)?;
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

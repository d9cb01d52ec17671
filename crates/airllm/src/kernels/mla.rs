//! The absorbed products of DeepSeek's multi-head latent attention. `kv_b_proj` maps a
//! token's latent `c` (`rank` values) to each head's key part (`nope` rows) and value
//! (`v_dim` rows). Instead of expanding every cached latent, the key rows are folded into
//! the query (`q_lat = W_UKᵀ q_nope`, a product by `W`, not `Wᵀ`) and the value rows are
//! applied to the attention output in the latent space afterwards. `kv_b_proj` is gathered
//! as it arrives, in its file's form (it is small: 32 MiB in bf16 for DeepSeek-V3), so that
//! queries can then be taken a chunk at a time; key rows are widened a few at a time.

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
}

impl Default for ValueRows {
    fn default() -> Self {
        Self::new()
    }
}

/// Folds each head's key rows of `kv_b_proj` (`w`, all its rows as stored) into the latent
/// queries: `q_lat[:, h] = q_nope[:, h] · W_UK[h]`, a product by `W`, not `Wᵀ`, with the key
/// rows widened [`CHUNK`] at a time. `q_nope` is `[t, heads, nope]`, `q_lat` `[t, heads, rank]`.
pub fn absorb_keys(
    s: Latent,
    w: MatView,
    q_nope: &[f32],
    t: usize,
    q_lat: &mut [f32],
) -> Result<()> {
    let per_head = s.nope + s.v_dim;
    if w.cols != s.rank
        || w.rows != s.heads * per_head
        || q_nope.len() < t * s.heads * s.nope
        || q_lat.len() < t * s.heads * s.rank
    {
        return Err(Error::Internal(format!(
            "kv_b_proj of {} rows × {} does not fit latent attention of {} heads × ({} + {}) rows × {}",
            w.rows, w.cols, s.heads, s.nope, s.v_dim, s.rank
        )));
    }
    q_lat[..t * s.heads * s.rank].fill(0.0);
    let rb = w.form.row_bytes(w.cols);
    for h in 0..s.heads {
        let mut j = 0;
        while j < s.nope {
            let n = (s.nope - j).min(CHUNK);
            let r = h * per_head + j;
            let wide = MatView {
                form: w.form,
                rows: n,
                cols: w.cols,
                data: &w.data[r * rb..(r + n) * rb],
            }
            .to_f32()?;
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
            j += n;
        }
    }
    Ok(())
}

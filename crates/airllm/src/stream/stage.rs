//! Staging: weights that live on the host (held in memory, or just read from disk) reach the
//! compute device one slice at a time. A [`Link`] copies each slice into one of a few device
//! slots that are reused for the engine's life, and multiplies it there; on a GPU the copy of
//! the next slice runs on its own stream while the current one is multiplied.
//!
//! The [`Stager`] is device-generic: it cuts held matrices into slot-sized row ranges and
//! counts the bytes that cross the link. The links themselves are the device module's.

use candle_core::Tensor;

use crate::device::{HostRows, Link, ReadRows};
use crate::error::{Error, Result};
use crate::kernels::matmul::ROW_TILE;
use crate::weights::mat::MatView;

/// Cuts host matrices into slot-sized pieces for the link and counts what crosses it.
pub struct Stager {
    link: Box<dyn Link>,
    slot_bytes: u64,
    /// Weight bytes copied host→device so far.
    moved: u64,
}

impl Stager {
    pub fn new(link: Box<dyn Link>, slot_bytes: u64) -> Self {
        Stager {
            link,
            slot_bytes,
            moved: 0,
        }
    }

    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// `x Wᵀ` for a matrix held in host memory, copied over in slot-sized row ranges.
    pub fn matmul_held(&mut self, w: MatView<'_>, x: &Tensor) -> Result<Tensor> {
        let row_bytes = w.form.row_bytes(w.cols);
        let per = slice_rows(self.slot_bytes, row_bytes as u64, w.rows);
        let mut outs = Vec::with_capacity(w.rows.div_ceil(per));
        let mut start = 0;
        while start < w.rows {
            let n = per.min(w.rows - start);
            let part = MatView {
                rows: n,
                data: &w.data[start * row_bytes..(start + n) * row_bytes],
                ..w
            };
            self.moved += part.data.len() as u64;
            outs.push(self.link.matmul(HostRows::Held(part), x)?);
            start += n;
        }
        cat_columns(outs)
    }

    /// `x Wᵀ` for one slice the reader delivered.
    pub fn matmul_read(&mut self, s: Box<dyn ReadRows>, x: &Tensor) -> Result<Tensor> {
        let bytes = s.view().data.len() as u64;
        if bytes > self.slot_bytes {
            return Err(Error::Reader(format!(
                "a slice of {bytes} bytes does not fit a staging slot of {}",
                self.slot_bytes
            )));
        }
        self.moved += bytes;
        self.link.matmul(HostRows::Read(s), x)
    }

    pub fn finish(&mut self) -> Result<()> {
        self.link.finish()
    }
}

/// Joins per-slice products `[rows, n_i]` into `[rows, Σ n_i]`.
pub fn cat_columns(mut outs: Vec<Tensor>) -> Result<Tensor> {
    if outs.len() == 1 {
        return Ok(outs.pop().expect("one"));
    }
    let last = outs
        .first()
        .map(|t| t.rank() - 1)
        .ok_or_else(|| Error::Internal("a matrix with no rows".into()))?;
    Ok(Tensor::cat(&outs, last)?)
}

/// Rows per slice of a matrix whose rows take `row_bytes` in a read buffer: whole gemm tiles,
/// as many as fit in `slice_bytes`.
pub fn slice_rows(slice_bytes: u64, row_bytes: u64, rows: usize) -> usize {
    let tiles = (slice_bytes / (row_bytes.max(1) * ROW_TILE as u64)).max(1) as usize;
    (tiles * ROW_TILE).min(rows.max(1))
}

//! A fixed set of read buffers, reused for every slice: the reader takes one, fills it with
//! O_DIRECT reads and hands it on; compute gives it back when the slice is multiplied. Nothing
//! is allocated per read, and the pages of a reused buffer are already mapped, so there are no
//! page-fault storms.

use std::sync::{Condvar, Mutex};

use crate::stream::ledger::Charge;
use crate::weights::mat::AlignedBuf;

pub struct Pool {
    free: Mutex<(Vec<AlignedBuf>, bool)>,
    cv: Condvar,
    buf_bytes: usize,
    _charge: Charge,
}

impl Pool {
    /// `n` buffers of `buf_bytes` each, charged to the budget by `charge`.
    pub fn new(n: usize, buf_bytes: usize, charge: Charge) -> Self {
        Pool {
            free: Mutex::new((
                (0..n)
                    .map(|_| AlignedBuf::with_capacity(buf_bytes))
                    .collect(),
                false,
            )),
            cv: Condvar::new(),
            buf_bytes,
            _charge: charge,
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// Waits for a free buffer; `None` once the pool is closed.
    pub fn get(&self) -> Option<AlignedBuf> {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.1 {
                return None;
            }
            if let Some(b) = g.0.pop() {
                return Some(b);
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn put(&self, b: AlignedBuf) {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        g.0.push(b);
        self.cv.notify_one();
    }

    /// Wakes and refuses every waiter (the reader is being stopped).
    pub fn close(&self) {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = true;
        self.cv.notify_all();
    }
}

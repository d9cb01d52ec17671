//! Accounting of every byte the engine holds against the budget. Each allocation the plan
//! counts (resident layers and head, read buffers, KV caches, the working set) takes a
//! [`Charge`] that is returned when it is dropped, so `peak()` is the true high-water mark of
//! what we hold, and tests can check it never passes the budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct Ledger {
    budget: u64,
    held: AtomicU64,
    peak: AtomicU64,
}

impl Ledger {
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Ledger {
            budget,
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Records `bytes` as held until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Charge {
        let now = self.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(now, Ordering::SeqCst);
        if now > self.budget {
            tracing::warn!("holding {now} bytes, over the budget of {}", self.budget);
        }
        Charge {
            ledger: self.clone(),
            bytes,
        }
    }

    /// Like [`Ledger::charge`], but refuses when the budget would be passed.
    pub fn try_charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        let mut cur = self.held.load(Ordering::SeqCst);
        loop {
            if cur + bytes > self.budget {
                return None;
            }
            match self
                .held
                .compare_exchange(cur, cur + bytes, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.peak.fetch_max(cur + bytes, Ordering::SeqCst);
                    return Some(Charge {
                        ledger: self.clone(),
                        bytes,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }
}

pub struct Charge {
    ledger: Arc<Ledger>,
    bytes: u64,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.held.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

//! Streaming: the budget plan, the ledger that checks it, and the background layer reader.

pub mod ledger;
pub mod plan;
pub mod reader;

pub use ledger::{Charge, Ledger};
pub use plan::{Plan, PlanInput};
pub use reader::Prefetcher;

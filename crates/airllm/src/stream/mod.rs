//! Streaming: the plan over memory tiers (and the options it is made for), the placement of
//! each layer in a tier, the ledger that checks it, the buffer pool, the background reader of
//! weight slices, the expert cache, the layers kept resident, and staging slices through a
//! device link.

pub mod experts;
pub mod ledger;
pub mod lookahead;
pub mod placement;
pub mod plan;
pub mod pool;
pub mod reader;
pub mod resident;
pub mod stage;

pub use experts::{ExpertCache, ExpertStats};
pub use ledger::{Charge, Ledger};
pub use plan::{DeviceInput, DevicePlan, Plan, PlanInput};
pub use reader::Prefetcher;
pub use resident::HeldLayer;

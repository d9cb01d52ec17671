//! The engine's integration tests, one binary: each module is one former test file, and
//! `common` holds the helpers they share (fixtures, goldens, budgets).

mod accuracy;
mod bad_input;
mod common;
mod convert;
mod gguf_bad_input;
mod gguf_reference;
mod gguf_tiny;
mod hybrid;
mod latent;
mod lookahead;
mod moe;
mod reference;
mod scheduler;
mod speculative;
mod tiers;

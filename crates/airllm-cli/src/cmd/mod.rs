//! One file per command: each translates its flags into a session and its events into output.

pub mod bench;
pub mod chat;
pub mod files;
pub mod inspect;
pub mod perplexity;
pub mod run;
pub mod serve;

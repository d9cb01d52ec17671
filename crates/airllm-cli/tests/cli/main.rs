//! The `airllm` binary's end-to-end tests, one test binary: `run` (output contracts and bad
//! input), `convert` (conversion, `--compress`, perplexity), and `support`, their helpers.

mod convert;
mod run;
mod support;

//! What the CLI tests share: the fixture models, the binary, and the broken-model cases.

use std::path::PathBuf;
use std::process::{Command, Output};

#[path = "../../../../tests/support/broken.rs"]
pub mod broken;

/// The transformers fixture model `name` (the one place that names the fixtures folder).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(name)
}

/// The `airllm` binary run with `args`, to completion.
pub fn airllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airllm"))
        .args(args)
        .output()
        .unwrap()
}

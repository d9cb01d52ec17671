//! Broken checkpoints fail at open with a one-line error naming the file and the problem.

use crate::common;

use airllm::{Engine, EngineOptions};

#[test]
fn broken_models_give_one_line_errors() {
    for (what, _tmp, dir, needles) in common::broken::cases() {
        let e = match Engine::open(
            &dir,
            EngineOptions {
                max_memory: Some(1 << 30),
                ..Default::default()
            },
        ) {
            Ok(_) => panic!("{what}: opened without error"),
            Err(e) => e.to_string(),
        };
        assert!(!e.contains('\n'), "{what}: multi-line error: {e}");
        for n in &needles {
            assert!(
                e.contains(n.as_str()),
                "{what}: error `{e}` does not mention `{n}`"
            );
        }
    }
}

/// Both cases share one test because they set process-wide environment variables.
#[test]
fn repo_ids_resolve_from_the_cache_offline_or_name_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", tmp.path());
    std::env::remove_var("HF_HOME");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = airllm::hub::resolve("nobody/no-such-model", None, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("nobody/no-such-model: not in the cache"),
        "{e}"
    );
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");

    let snap = tmp.path().join("models--tiny--llama/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(tmp.path().join("models--tiny--llama/refs")).unwrap();
    std::fs::write(tmp.path().join("models--tiny--llama/refs/main"), "abc123").unwrap();
    let src = common::fixtures().join("llama-gqa2-llama3rope");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let dir = airllm::hub::resolve("tiny/llama", None, false).unwrap();
    assert_eq!(dir, snap);
}

//! `airllm convert`, `--compress` and `perplexity` end to end: the cache's reuse rule, and the
//! failures a conversion can meet (unknown architecture, missing folder, full disk, a kill
//! midway), none of which may leave a file behind.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::{airllm, fixture};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// One line on stderr, starting `error:`, and a failure status.
fn assert_one_line_error(out: &Output, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for s in must_contain {
        assert!(lines[0].contains(s), "`{s}` missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn converting_an_unsupported_architecture_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_dir(&fixture("llama-gqa2-llama3rope"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let out_path = tmp.path().join("o.gguf");
    let out = airllm(&[
        "convert",
        "-m",
        m.to_str().unwrap(),
        "-q",
        "q8_0",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["FalconForCausalLM", "config.json", "supported"]);
    assert!(!out_path.exists());
}

#[test]
fn converting_into_a_missing_folder_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("no/such/dir/o.gguf");
    let out = airllm(&[
        "convert",
        "-m",
        fixture("qwen3-qknorm-headdim").to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["no/such/dir", "does not exist"]);
}

#[test]
fn unknown_quantization_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = airllm(&[
        "convert",
        "-m",
        fixture("qwen3-qknorm-headdim").to_str().unwrap(),
        "-q",
        "q3_xs",
        "-o",
        tmp.path().join("o.gguf").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["q3_xs", "q8_0"]);
    assert!(files_in(tmp.path()).is_empty());
}

#[test]
fn a_full_disk_names_the_bytes_needed_and_leaves_no_file() {
    // A file-size limit stands in for a full disk: writes past it fail with EFBIG, as a full
    // disk fails them with ENOSPC.
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("o.gguf");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_airllm"));
    cmd.args([
        "convert",
        "-m",
        fixture("qwen3-qknorm-headdim").to_str().unwrap(),
        "-q",
        "f32",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            // Without this the kernel kills the writer with SIGXFSZ instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_one_line_error(&out, &["o.gguf", "needs", "bytes"]);
    assert!(
        files_in(tmp.path()).is_empty(),
        "{:?}",
        files_in(tmp.path())
    );
}

#[test]
fn a_killed_conversion_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    let s = airllm(&[
        "synth",
        "--shape",
        "tiny",
        "--hidden",
        "1024",
        "--intermediate",
        "2816",
        "--layers",
        "4",
        "--heads",
        "8",
        "--kv-heads",
        "8",
        "--vocab",
        "32000",
        "-o",
        m.to_str().unwrap(),
    ]);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out_path = outdir.join("o.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_airllm"))
        .args([
            "convert",
            "-m",
            m.to_str().unwrap(),
            "-q",
            "q4_k",
            "-o",
            out_path.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written something.
    let io = format!("/proc/{}/io", child.id());
    let t = std::time::Instant::now();
    let mut wrote = false;
    while t.elapsed().as_secs() < 60 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let w = std::fs::read_to_string(&io)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| {
                        l.strip_prefix("wchar: ")
                            .map(|v| v.trim().parse::<u64>().ok())
                    })
                    .flatten()
            })
            .unwrap_or(0);
        if w > 4 << 20 {
            wrote = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        wrote,
        "the conversion finished or never wrote before it could be killed"
    );
    assert!(!status.success());
    assert!(files_in(&outdir).is_empty(), "{:?}", files_in(&outdir));
}

#[test]
fn compress_converts_once_and_again_when_the_source_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_dir(&fixture("qwen2-bias-mha-sharded"), &m);
    let cache = tmp.path().join("cache");
    let run = || {
        airllm(&[
            "run",
            "-m",
            m.to_str().unwrap(),
            "-p",
            "Hello world",
            "-n",
            "8",
            "--temperature",
            "0",
            "--ignore-eos",
            "--compress",
            "q8_0",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    let first = run();
    let e1 = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{e1}");
    assert!(e1.contains("compressed into"), "{e1}");
    let second = run();
    let e2 = String::from_utf8_lossy(&second.stderr);
    assert!(e2.contains("using cached"), "{e2}");
    assert_eq!(first.stdout, second.stdout);

    // Rewrite a shard (same bytes, new modification time): the entry must be rebuilt.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let shard = files_in(&m)
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    let bytes = std::fs::read(m.join(&shard)).unwrap();
    std::fs::write(m.join(&shard), bytes).unwrap();
    let third = run();
    let e3 = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{e3}");
    assert!(e3.contains("compressed into"), "{e3}");
    assert_eq!(first.stdout, third.stdout);
}

#[test]
fn perplexity_json_has_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let out = airllm(&[
        "perplexity",
        "-m",
        fixture("llama-gqa2-llama3rope").to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "ctx",
        "windows",
        "scored",
        "nll",
        "ppl",
        "running",
        "tokens_per_s",
    ] {
        assert!(v.get(k).is_some(), "{k} missing: {v}");
    }
    assert_eq!(v["ctx"], 128);
    // 128-token windows score tokens 64..126 of each.
    assert_eq!(
        v["scored"].as_u64().unwrap(),
        v["windows"].as_u64().unwrap() * 63
    );
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
}

//! The `airllm` binary end to end on the fixture models: output contracts and bad input.

use std::process::Command;

use crate::support::{airllm, broken, fixture};

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

/// `airllm run --json` greedy (16 tokens, past EOS) on both prompts of the llama fixture at
/// `budget`, with `extra` flags: stderr and one JSON object per line of stdout.
fn run_llama_json(budget: &str, extra: &[&str]) -> (String, Vec<serde_json::Value>) {
    let r = reference("llama-gqa2-llama3rope");
    let m = fixture("llama-gqa2-llama3rope");
    let mut args = vec![
        "run",
        "--model",
        m.to_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--max-memory",
        budget,
    ];
    for i in 0..2 {
        args.extend(["--prompt", r["prompts"][i].as_str().unwrap()]);
    }
    args.extend(extra);
    let out = airllm(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{extra:?}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (stderr, lines)
}

#[test]
fn run_json_gives_one_object_per_prompt_matching_transformers() {
    let r = reference("llama-gqa2-llama3rope");
    let (stderr, lines) = run_llama_json("8MiB", &[]);
    assert!(stderr.contains("streamed"), "the plan is printed: {stderr}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["prompt"], r["prompts"][i]);
        assert_eq!(v["prompt_token_ids"], r["prompt_token_ids"][i]);
        assert_eq!(v["token_ids"], r["greedy_token_ids"][i]);
        assert_eq!(v["finish_reason"], "length");
        assert!(v["text"].is_string());
    }
}

#[test]
fn run_streams_text_and_profile_goes_to_stderr() {
    let m = fixture("qwen3-qknorm-headdim");
    let out = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "The quick brown fox",
        "-n",
        "6",
        "--seed",
        "3",
        "--max-memory",
        "4MiB",
        "--profile",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("profile: decode") && stderr.contains("waited for I/O"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("profile"));
    // Same seed, same output.
    let again = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "The quick brown fox",
        "-n",
        "6",
        "--seed",
        "3",
        "--max-memory",
        "4MiB",
    ]);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn budget_below_minimum_is_refused_with_the_minimum() {
    let m = fixture("mistral-sliding-window");
    let out = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "hi",
        "--max-memory",
        "10KiB",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("below the minimum of"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn inspect_describes_the_model_and_plan() {
    let m = fixture("qwen2-bias-mha-sharded");
    let out = airllm(&[
        "inspect",
        "-m",
        m.to_str().unwrap(),
        "--max-memory",
        "8MiB",
        "-c",
        "64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Qwen2ForCausalLM",
        "parameters:",
        "layers:",
        "resident",
        "bytes read per token",
    ] {
        assert!(s.contains(needle), "missing {needle}: {s}");
    }
    // It takes the options that change the plan, as `run` does: the f16 form halves this f32
    // model's layers, and a batch of 4 needs four KV caches.
    let line = |s: &str, pat: &str| s.lines().find(|l| l.contains(pat)).unwrap().to_string();
    let out2 = airllm(&[
        "inspect",
        "-m",
        m.to_str().unwrap(),
        "--max-memory",
        "64MiB",
        "-c",
        "64",
        "--f16",
        "--batch",
        "4",
    ]);
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    let s2 = String::from_utf8_lossy(&out2.stdout);
    assert_ne!(line(&s, "layers:"), line(&s2, "layers:"));
    assert_ne!(line(&s, "KV cache"), line(&s2, "KV cache"));
}

#[test]
fn bad_inputs_exit_nonzero_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let qwen3 = fixture("qwen3-qknorm-headdim").display().to_string();
    let (junk, missing) = (junk.display().to_string(), missing.display().to_string());
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "-m", &junk, "-p", "x"], "not a GGUF file"),
        (
            vec!["run", "-m", &missing, "-p", "x"],
            "no such file or folder",
        ),
        (
            vec!["run", "-m", &qwen3, "-p", "x", "--max-memory", "lots"],
            "--max-memory",
        ),
        (
            vec!["run", "-m", &qwen3, "-p", "x", "--device", "tpu"],
            "expected cpu, cuda or cuda:N",
        ),
        (
            vec![
                "inspect",
                "-m",
                &qwen3,
                "--device",
                "cpu",
                "--gpu-memory",
                "1KiB",
            ],
            "device budget",
        ),
    ];
    // A binary without the cuda feature says how to get one.
    if !cfg!(feature = "cuda") {
        cases.push((
            vec!["run", "-m", &qwen3, "-p", "x", "--device", "cuda:0"],
            "scripts/build_cuda.sh",
        ));
    }
    for (args, needle) in cases {
        let out = airllm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

/// `airllm chat` on the qwen3 fixture with `extra` flags, two user turns on stdin.
fn chat_two_turns(extra: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Write;
    let m = fixture("qwen3-qknorm-headdim");
    let mut args = vec![
        "chat",
        "-m",
        m.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-memory",
        "64MiB",
        "-c",
        "256",
    ];
    args.extend(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_airllm"))
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nAnd again\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn chat_keeps_the_conversation() {
    let (status, stderr) = chat_two_turns(&["-n", "4"]);
    assert!(status.success(), "{stderr}");
    // One summary line per turn.
    assert_eq!(stderr.matches("generated").count(), 2, "{stderr}");
}

#[test]
fn broken_models_exit_nonzero_with_a_one_line_error() {
    for (what, _tmp, dir, needles) in broken::cases() {
        for cmd in ["run", "inspect"] {
            let mut args = vec![cmd, "-m", dir.to_str().unwrap(), "--max-memory", "64MiB"];
            if cmd == "run" {
                args.extend(["-p", "hello", "-n", "2"]);
            }
            let out = airllm(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what} ({cmd}): {stderr}");
            assert!(!stderr.contains("panicked"), "{what} ({cmd}): {stderr}");
            let last = stderr.trim_end().lines().last().unwrap_or("");
            assert!(last.starts_with("error: "), "{what} ({cmd}): {stderr}");
            for n in &needles {
                assert!(
                    last.contains(n.as_str()),
                    "{what} ({cmd}): `{last}` lacks `{n}`"
                );
            }
            if cmd == "run" {
                assert!(out.stdout.is_empty(), "{what}: output on stdout");
            }
        }
    }
}

#[test]
fn stop_strings_and_eos_finish_with_stop() {
    let name = "llama-gqa2-llama3rope";
    let r = reference(name);
    let m = fixture(name);
    let p0 = r["prompts"][0].as_str().unwrap();
    // The greedy continuation is known; stop on a piece of its text.
    let full = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        p0,
        "-n",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--max-memory",
        "64MiB",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    let text = v["text"].as_str().unwrap().to_string();
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map(|(i, _)| i)
        .unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    assert!(!stop.is_empty());
    let out = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        p0,
        "-n",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--stop",
        &stop,
        "--max-memory",
        "64MiB",
    ]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["finish_reason"], "stop");
    let want = &text[..text.find(&stop).unwrap()];
    assert_eq!(s["text"].as_str().unwrap(), want);
    // Streaming (without --json) prints the same text, never the stop string.
    let plain = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        p0,
        "-n",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--stop",
        &stop,
        "--max-memory",
        "64MiB",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout).trim_end_matches('\n'),
        want
    );
}

/// The three tiers through the simulated device (`--device cpu --gpu-memory`): the plan says
/// where each layer is and what crosses each link, and `bench` counts the bytes moved.
#[test]
fn device_tier_plan_and_bench() {
    let m = fixture("llama-gqa2-llama3rope");
    let m = m.to_str().unwrap();
    let tiers = [
        "--device",
        "cpu",
        "--gpu-memory",
        "2MiB",
        "--max-memory",
        "8MiB",
    ];
    let mut args = vec!["inspect", "-m", m, "-c", "64"];
    args.extend(tiers);
    let out = airllm(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "device budget 2.00 MiB",
        "on the device",
        "in host memory",
        "host→device",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    // bench sizes the context to its prompt, so a smaller device budget splits the tiers.
    let mut args = vec![
        "bench",
        "-m",
        m,
        "--prompt-len",
        "8",
        "--gen",
        "3",
        "--json",
    ];
    args.extend([
        "--device",
        "cpu",
        "--gpu-memory",
        "700KiB",
        "--max-memory",
        "8MiB",
    ]);
    let out = airllm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let moved = v["bytes_moved_per_token"].as_u64().unwrap();
    assert!(moved > 0, "{v}");
    assert!(
        moved <= v["planned_bytes_moved_per_token"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(v["device_resident_layers"], 1, "{v}");
    assert!(
        v["device_ledger_peak_bytes"].as_u64().unwrap() <= 700 << 10,
        "{v}"
    );
}

#[test]
fn synth_then_bench_reports_every_field_within_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("synth");
    let gguf = tmp.path().join("synth.gguf");
    let out = airllm(&[
        "synth",
        "--shape",
        "tiny",
        "--layers",
        "6",
        "--dtype",
        "bf16",
        "--out",
        model.to_str().unwrap(),
        "--gguf",
        gguf.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The GGUF copy holds the same weights: both give the same greedy tokens.
    let greedy = |m: &std::path::Path| {
        let o = airllm(&[
            "run",
            "-m",
            m.to_str().unwrap(),
            "-p",
            "Hello",
            "-n",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token_ids"].clone()
    };
    assert_eq!(greedy(&model), greedy(&gguf));
    // The same seed gives the same bytes.
    let again = tmp.path().join("again");
    assert!(airllm(&[
        "synth",
        "--shape",
        "tiny",
        "--layers",
        "6",
        "--out",
        again.to_str().unwrap()
    ])
    .status
    .success());
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );

    // Held in bf16, the 6-layer model takes about 9 MiB; 6 MiB makes it stream.
    let budget: u64 = 6 << 20;
    let out = airllm(&[
        "bench",
        "-m",
        model.to_str().unwrap(),
        "--max-memory",
        "6MiB",
        "--prompt-len",
        "8",
        "--gen",
        "3",
        "--batch",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in [
        "prefill_tokens_per_s",
        "decode_s_per_token",
        "bytes_read_per_token",
        "effective_read_bandwidth",
        "io_wait_share",
        "peak_rss_bytes",
        "raw_read_bandwidth",
        "utilization",
    ] {
        let x = v[f].as_f64().unwrap_or_else(|| panic!("{f} missing: {v}"));
        assert!(x.is_finite() && x >= 0.0, "{f} = {x}");
    }
    assert!(
        v["streamed_layers"].as_u64().unwrap() > 0,
        "the budget should force streaming: {v}"
    );
    assert!(v["bytes_read_per_token"].as_u64().unwrap() > 0);
    let rss = v["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss > 0 && rss <= budget + (64 << 20),
        "peak RSS {rss} over budget + 64 MiB"
    );
    assert!(v["ledger_peak_bytes"].as_u64().unwrap() <= budget);
}

#[test]
fn run_with_a_draft_or_lookup_gives_transformers_greedy_tokens() {
    let r = reference("llama-gqa2-llama3rope");
    let draft = fixture("mistral-sliding-window");
    for spec in [
        vec!["--draft", draft.to_str().unwrap()],
        vec!["--lookup", "6"],
    ] {
        // The model streamed, the draft resident beside it.
        let (stderr, lines) = run_llama_json("24MiB", &spec);
        assert!(stderr.contains("speculation: "), "{spec:?}: {stderr}");
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (i, v) in lines.iter().enumerate() {
            assert_eq!(
                v["token_ids"], r["greedy_token_ids"][i],
                "{spec:?}: prompt {i}"
            );
        }
    }
}

#[test]
fn a_draft_is_checked_and_reported() {
    let m = fixture("llama-gqa2-llama3rope");
    let other = fixture("qwen2-bias-mha-sharded");
    let out = airllm(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "Hi",
        "--draft",
        m.to_str().unwrap(),
        "--lookup",
        "4",
    ]);
    assert!(!out.status.success(), "--draft and --lookup together");
    // A draft that cannot be opened: one line naming it.
    let out = airllm(&[
        "run",
        "-m",
        other.to_str().unwrap(),
        "-p",
        "Hi",
        "--draft",
        "/nonexistent/draft",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--draft /nonexistent/draft"), "{stderr}");
    // bench --json reports acceptance and tokens per sweep.
    let out = airllm(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "--gen",
        "12",
        "--json",
        "--draft",
        fixture("mistral-sliding-window").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["speculation"];
    assert_eq!(s["source"], "draft", "{v}");
    assert!(s["tokens_per_sweep"].as_f64().unwrap() >= 1.0, "{v}");
    assert!(s["acceptance_rate"].as_f64().is_some(), "{v}");
    assert_eq!(v["decode_tokens"], 12, "{v}");
}

#[test]
fn chat_with_guesses_keeps_the_conversation() {
    // The draft's cache goes on from turn to turn, as the model's does.
    let draft = fixture("qwen2-bias-mha-sharded");
    for spec in [
        vec!["--lookup", "4"],
        vec!["--draft", draft.to_str().unwrap()],
    ] {
        let mut args = vec!["-n", "12"];
        args.extend(&spec);
        let (status, stderr) = chat_two_turns(&args);
        assert!(status.success(), "{spec:?}: {stderr}");
        assert_eq!(stderr.matches("speculation: ").count(), 2, "{stderr}");
    }
}

/// `inspect` plans what `run` does with the same options: on the default model (whose 262k
/// vocabulary makes the tokenizer a large part of the budget), over contexts, batches and
/// sweep sizes, `inspect`'s minimum is exactly where `run` starts to refuse, and at budgets
/// above it both print the same plan.
#[test]
fn inspect_plans_what_run_runs() {
    for (ctx, batch, chunk) in [(64, 1, 16), (64, 3, 512), (700, 1, 512), (700, 3, 16)] {
        let (c, n, b) = (ctx.to_string(), batch.to_string(), chunk.to_string());
        let shape = ["-c", c.as_str(), "-b", b.as_str()];
        let inspect = |budget: &str, json: bool| {
            let mut args = vec!["inspect", "--max-memory", budget, "--batch", n.as_str()];
            args.extend(shape);
            if json {
                args.push("--json");
            }
            airllm(&args)
        };
        let run = |budget: u64| {
            let budget = budget.to_string();
            let mut args = vec!["run", "--max-memory", budget.as_str(), "-n", "1"];
            args.extend(shape);
            for _ in 0..batch {
                args.extend(["-p", "Hello"]);
            }
            airllm(&args)
        };
        let what = format!("-c {ctx} --batch {batch} -b {chunk}");
        let out = inspect("1TiB", true);
        assert!(out.status.success(), "{what}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let min = v["plan"]["minimum"].as_u64().unwrap();
        let all = v["plan"]["layer_bytes"].as_u64().unwrap() * v["layers"].as_u64().unwrap() + min;
        assert!(v["tokenizer_bytes"].as_u64().unwrap() > 10 << 20, "{v}");
        let below = run(min - 1);
        let stderr = String::from_utf8_lossy(&below.stderr);
        assert!(!below.status.success(), "{what}: run at {}", min - 1);
        assert!(stderr.contains("is below the minimum"), "{what}: {stderr}");
        // At the minimum and above, run's plan is inspect's, line for line.
        for budget in [min, min + (all - min) / 3] {
            let out = inspect(&budget.to_string(), false);
            assert!(out.status.success(), "{what}: inspect at {budget}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let plan = &stdout[stdout.find("plan: ").unwrap()..];
            let ran = run(budget);
            let stderr = String::from_utf8_lossy(&ran.stderr);
            assert!(ran.status.success(), "{what}: run at {budget}: {stderr}");
            assert!(
                stderr.contains(plan.trim()),
                "{what} at {budget}:\n{plan}\nvs\n{stderr}"
            );
        }
    }
}

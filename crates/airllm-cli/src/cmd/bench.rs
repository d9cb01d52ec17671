//! `airllm bench`: prefill and decode speed, bytes read, I/O wait and peak memory under a
//! budget, with the disk's raw read bandwidth measured on the model's files in the same run.

use std::time::Instant;

use airllm::generate::{DraftSource, Event, GenerationParams, Request};
use airllm::session::Hook;
use airllm::util::{fmt_bytes, parse_size};
use anyhow::{bail, Context, Result};

use crate::args::{prepare, start, BenchArgs};
use crate::report;

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.batch == 0 {
        bail!("--prompt-len, --gen and --batch must be at least 1");
    }
    let mut o = a.model.session_options(Some(&a.spec))?;
    // Random token ids need no tokenizer (nor is a draft's checked against one).
    o.tokenizer = false;
    o.keep_page_cache = a.keep_page_cache;
    let prep = prepare(&a.model, &o)?;
    let dir = prep.info.dir.clone();
    let vocab = prep.info.cfg.vocab_size as u64;
    let model_bytes = prep.info.sizes.file_bytes;
    let raw_cap = match &a.raw_bytes {
        Some(s) => parse_size(s).context("--raw-bytes")?,
        None => model_bytes.min(2 << 30),
    };
    let files = prep.info.src.files();
    let (raw_n, raw_t, direct) = airllm::bench::raw_read_bandwidth(&files, raw_cap)?;
    let raw_seq = raw_n as f64 / raw_t.as_secs_f64().max(1e-9);
    // Also with the reader's queue depth: the faster of the two is the disk's raw speed.
    let raw_queued = airllm::bench::raw_read_bandwidth_queued(&files, raw_cap, 4)?
        .map(|(n, t)| n as f64 / t.as_secs_f64().max(1e-9));
    let raw_bw = raw_seq.max(raw_queued.unwrap_or(0.0));
    // The GPU's memory in use before the engine holds anything (context, kernels, cuBLAS).
    let device = o.device.clone();
    let backend = airllm::device::of(&device);
    let h2d = backend.h2d_bandwidth(&device, 256 << 20)?;
    let dev_base = backend.memory_used(&device)?;
    backend.pool_peak(&device, true)?;
    let work = a.model.workload(
        Some(a.prompt_len + a.gen + 1),
        a.batch,
        Some(a.prompt_len * a.batch),
    );
    let mut s = start(prep, &work)?;
    let mut dev_peak = 0u64;
    let sample = |dev_peak: &mut u64| -> airllm::Result<()> {
        if let (Some(b), Some(u)) = (dev_base, backend.memory_used(&device)?) {
            *dev_peak = (*dev_peak).max(u.saturating_sub(b));
        }
        Ok(())
    };
    sample(&mut dev_peak)?;
    // Deterministic pseudo-random prompts.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| (0..a.prompt_len).map(|_| next()).collect())
        .collect();
    // The scheduler runs it as it runs requests: prefill in chunks of at most --batch-size
    // tokens per sweep, then one sweep per decode step for all sequences. Greedy, past EOS.
    let gp = GenerationParams {
        max_new_tokens: a.gen + 1,
        ignore_eos: true,
        ..Default::default()
    };
    let reqs = prompts
        .iter()
        .map(|p| Request::new(p.clone(), gp.clone()))
        .collect();
    // Prefill ends when every request has sampled its first token; tokens after the first are
    // decode's, and decode's bytes read count from there.
    let mut started = vec![false; a.batch];
    let (mut decoded, mut sweeps) = (0usize, 0usize);
    let t0 = Instant::now();
    let mut decode_from: Option<(Instant, u64)> = None;
    s.run(reqs, |h| {
        match h {
            Hook::Event(i, Event::Tokens { tokens, .. }) => {
                decoded += tokens.len() - usize::from(!std::mem::replace(&mut started[i], true));
            }
            Hook::Swept(engine) => match decode_from {
                None if started.iter().all(|&s| s) => {
                    decode_from = Some((Instant::now(), engine.bytes_read()));
                    decoded = 0;
                }
                None => {}
                Some(_) => {
                    sweeps += 1;
                    sample(&mut dev_peak)?;
                }
            },
            Hook::Event(..) => {}
        }
        Ok(())
    })?;
    let Some((t_decode, read0)) = decode_from else {
        bail!("internal error: the benchmark ended before its prefill");
    };
    let prefill = t_decode - t0;
    let decode = t_decode.elapsed();
    let engine = s.engine();
    let sched = s.scheduler();
    let dev_pool_peak = backend.pool_peak(&device, false)?;
    let read = engine.bytes_read() - read0;
    let d = &engine.decode_profile;
    let per_step = decode.as_secs_f64() / a.gen as f64;
    let eff_bw = read as f64 / decode.as_secs_f64().max(1e-9);
    let report = serde_json::json!({
        "model": dir.display().to_string(),
        "model_bytes": model_bytes,
        "budget_bytes": engine.plan().budget,
        "resident_layers": engine.plan().resident_layers,
        "streamed_layers": engine.plan().streamed_layers,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "prefill_tokens_per_s": (a.prompt_len * a.batch) as f64 / prefill.as_secs_f64().max(1e-9),
        "decode_s_per_token": per_step,
        "decode_tokens_per_s": (a.gen * a.batch) as f64 / decode.as_secs_f64().max(1e-9),
        "bytes_read_per_token": read / a.gen as u64,
        "planned_bytes_read_per_token": engine.plan().bytes_read_per_token,
        "effective_read_bandwidth": eff_bw,
        "io_wait_share": d.total_wait().as_secs_f64() / d.wall.as_secs_f64().max(1e-9),
        "peak_rss_bytes": airllm::util::peak_rss().unwrap_or(0),
        "ledger_peak_bytes": engine.ledger().peak(),
        "raw_read_bandwidth": raw_bw,
        "raw_read_bandwidth_sequential": raw_seq,
        "raw_read_bandwidth_queued": raw_queued,
        "raw_read_bytes": raw_n,
        "raw_read_direct_io": direct,
        "utilization": eff_bw / raw_bw.max(1e-9),
        "page_cache": if a.keep_page_cache { "kept" } else { "dropped after reads" },
    });
    let mut report = report;
    let disk_bound = (read / a.gen as u64) as f64 / raw_bw.max(1.0);
    let mut extra = serde_json::json!({
        "disk_bound_s_per_token": disk_bound,
        "decode_vs_disk_bound": per_step / disk_bound.max(1e-12),
    });
    extra["decode_tokens"] = decoded.into();
    extra["decode_sweeps"] = sweeps.into();
    if let Some(sp) = sched.speculation() {
        let st = &sp.stats;
        extra["speculation"] = serde_json::json!({
            "source": match sp.source {
                DraftSource::Model(_) => "draft",
                DraftSource::Lookup => "lookup",
            },
            "max_draft": sp.max_draft,
            "rounds": st.rounds,
            "drafted": st.drafted,
            "accepted": st.accepted,
            "acceptance_rate": st.acceptance(),
            "tokens_per_sweep": st.tokens_per_sweep(),
            "draft_sweeps": st.draft_sweeps,
            "draft_s": st.draft_time.as_secs_f64(),
        });
    }
    let plan = engine.plan();
    if plan.experts_total > 0 {
        let e = &d.experts;
        let per = |n: u64| n as f64 / a.gen as f64;
        extra["experts_total"] = plan.experts_total.into();
        extra["expert_cache_slots"] = plan.expert_slots.into();
        extra["expert_cache_bytes"] = (plan.expert_slots as u64 * plan.expert_bytes).into();
        extra["expert_hit_rate"] = e.hit_rate().into();
        extra["experts_used_per_token"] = per(e.hits + e.misses).into();
        extra["experts_read_per_token"] = per(e.reads()).into();
        extra["expert_lookahead"] = if plan.lookahead_bytes > 0 {
            "where it pays"
        } else {
            "off"
        }
        .into();
        extra["lookahead_precision"] = e.precision().into();
        extra["lookahead_experts_read_per_token"] = per(e.read_ahead).into();
        extra["lookahead_bytes_read_per_token"] = (e.ahead_bytes / a.gen as u64).into();
        extra["lookahead_bytes_wasted_per_token"] = (e.wasted_bytes / a.gen as u64).into();
        extra["expert_bytes_read_per_token"] = (e.bytes_read / a.gen as u64).into();
        extra["cold_cache_bytes_read_per_token"] = plan.bytes_read_per_token.into();
    }
    if let (Some(r), Some(e)) = (report.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    if let Some(dp) = &engine.plan().device {
        let moved = d.moved / d.steps.max(1) as u64;
        // The slower link bounds a token: host→GPU for what is not resident there, and
        // disk→host for what is not held in host memory either.
        let disk_s = (read / a.gen as u64) as f64 / raw_bw.max(1.0);
        let bound = h2d.map(|bw| (moved as f64 / bw.max(1.0)).max(disk_s));
        let link = h2d.map(|bw| {
            if disk_s > moved as f64 / bw.max(1.0) {
                "disk→host"
            } else {
                "host→device"
            }
        });
        let peak = dev_pool_peak.unwrap_or(0).max(dev_peak);
        let extra = serde_json::json!({
            "device": a.model.device,
            "device_budget_bytes": dp.budget,
            "device_resident_layers": dp.resident_layers,
            "device_head_resident": dp.head_resident,
            "bytes_moved_per_token": moved,
            "planned_bytes_moved_per_token": dp.bytes_moved_per_token,
            "h2d_bandwidth_pinned": h2d,
            "decode_bound_s_per_token": bound,
            "decode_bound_link": link,
            "decode_vs_bound": bound.map(|b| per_step / b.max(1e-12)),
            "device_peak_bytes": if device.is_cpu() { None } else { Some(peak) },
            "device_peak_sampled_bytes": dev_base.map(|_| dev_peak),
            "device_pool_peak_bytes": dev_pool_peak,
            "device_ledger_peak_bytes": engine.device_ledger().map(|l| l.peak()),
        });
        if let (Some(r), Some(e)) = (report.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
    }
    if a.json {
        println!("{report}");
    } else {
        let gb = |b: f64| format!("{:.2} GB/s", b / 1e9);
        println!("| metric | value |");
        println!("|---|---|");
        println!(
            "| prefill | {:.1} tokens/s |",
            report["prefill_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| decode | {per_step:.3} s/step ({:.2} tokens/s at batch {}) |",
            report["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            a.batch
        );
        println!(
            "| bytes read per token | {} |",
            fmt_bytes(read / a.gen as u64)
        );
        println!("| effective read bandwidth | {} |", gb(eff_bw));
        if let Some(sp) = report.get("speculation") {
            println!(
                "| speculation ({}) | {:.1}% of guesses accepted, {:.2} tokens per sweep |",
                sp["source"].as_str().unwrap_or("?"),
                100.0 * sp["acceptance_rate"].as_f64().unwrap_or(0.0),
                sp["tokens_per_sweep"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(m) = report["bytes_moved_per_token"].as_u64() {
            println!("| bytes moved host→device per token | {} |", fmt_bytes(m));
            if let Some(bw) = report["h2d_bandwidth_pinned"].as_f64() {
                println!("| pinned host→device bandwidth | {} |", gb(bw));
            }
            if let Some(b) = report["decode_bound_s_per_token"].as_f64() {
                println!(
                    "| decode vs the slower link's bound ({}) | {per_step:.3} / {b:.3} s = {:.2}× |",
                    report["decode_bound_link"].as_str().unwrap_or("?"),
                    per_step / b.max(1e-12)
                );
            }
            if let Some(p) = report["device_peak_bytes"].as_u64() {
                println!(
                    "| device memory peak | {} of {} |",
                    fmt_bytes(p),
                    fmt_bytes(report["device_budget_bytes"].as_u64().unwrap_or(0))
                );
            }
        }
        println!(
            "| decode vs the disk's bound (bytes read / raw bandwidth) | {per_step:.3} / {disk_bound:.3} s = {:.2}× |",
            per_step / disk_bound.max(1e-12)
        );
        if let Some(rate) = report["expert_hit_rate"].as_f64() {
            println!(
                "| experts per token: used, read, hit rate | {:.1}, {:.1}, {:.0}% ({} cache slots of {}) |",
                report["experts_used_per_token"].as_f64().unwrap_or(0.0),
                report["experts_read_per_token"].as_f64().unwrap_or(0.0),
                100.0 * rate,
                report["expert_cache_slots"],
                report["experts_total"]
            );
            println!(
                "| expert bytes read per token | {} |",
                fmt_bytes(report["expert_bytes_read_per_token"].as_u64().unwrap_or(0))
            );
            if let Some(p) = report["lookahead_precision"].as_f64() {
                println!(
                    "| look-ahead: precision, read ahead, wasted per token | {:.0}%, {}, {} |",
                    100.0 * p,
                    fmt_bytes(
                        report["lookahead_bytes_read_per_token"]
                            .as_u64()
                            .unwrap_or(0)
                    ),
                    fmt_bytes(
                        report["lookahead_bytes_wasted_per_token"]
                            .as_u64()
                            .unwrap_or(0)
                    )
                );
            }
        }
        println!(
            "| compute waiting for I/O | {:.0}% |",
            100.0 * report["io_wait_share"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| peak RSS (VmHWM) | {} |",
            fmt_bytes(report["peak_rss_bytes"].as_u64().unwrap_or(0))
        );
        println!(
            "| raw sequential read, one 16 MiB request at a time ({}) | {} |",
            if direct {
                "O_DIRECT"
            } else {
                "buffered, cache dropped"
            },
            gb(raw_seq)
        );
        if let Some(q) = raw_queued {
            println!(
                "| raw read, 4 × 4 MiB requests in flight (O_DIRECT) | {} |",
                gb(q)
            );
        }
        println!(
            "| utilization (effective / raw) | {:.0}% |",
            100.0 * eff_bw / raw_bw.max(1e-9)
        );
    }
    if a.model.profile {
        report::profile(engine);
    }
    Ok(())
}

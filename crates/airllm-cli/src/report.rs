//! What `run` and `chat` print to stderr after generating: throughput, and with `--profile` where
//! each layer's time went.

use std::time::Duration;

use airllm::engine::Profile;
use airllm::util::{fmt_bytes, peak_rss};
use airllm::Engine;

pub fn summary(engine: &Engine, generated: usize, elapsed: Duration) {
    let p = &engine.prefill_profile;
    let d = &engine.decode_profile;
    eprintln!(
        "generated {generated} tokens in {:.2}s: prefill {:.2}s, decode {:.3} s/step ({:.2} steps/s); ledger peak {} of {}; peak RSS {}",
        elapsed.as_secs_f64(),
        p.wall.as_secs_f64(),
        per_step(d.wall, d.steps),
        if d.wall.is_zero() { 0.0 } else { d.steps as f64 / d.wall.as_secs_f64() },
        fmt_bytes(engine.ledger().peak()),
        fmt_bytes(engine.ledger().budget()),
        peak_rss().map_or("?".into(), fmt_bytes),
    );
}

/// What speculation did, when the scheduler speculates.
pub fn speculation(sched: &airllm::generate::Scheduler) {
    let Some(s) = sched.speculation() else {
        return;
    };
    let st = &s.stats;
    eprintln!(
        "speculation: {} of {} guesses accepted ({:.1}%), {:.2} tokens per sweep{}",
        st.accepted,
        st.drafted,
        100.0 * st.acceptance(),
        st.tokens_per_sweep(),
        if st.draft_sweeps > 0 {
            format!(
                "; draft model {} sweeps, {:.2}s",
                st.draft_sweeps,
                st.draft_time.as_secs_f64()
            )
        } else {
            String::new()
        }
    );
}

fn per_step(d: Duration, steps: usize) -> f64 {
    if steps == 0 {
        0.0
    } else {
        d.as_secs_f64() / steps as f64
    }
}

fn ms(d: Duration, steps: usize) -> f64 {
    per_step(d, steps) * 1e3
}

pub fn profile(engine: &Engine) {
    for (name, p) in [
        ("prefill", &engine.prefill_profile),
        ("decode", &engine.decode_profile),
    ] {
        print_phase(name, p);
    }
}

fn print_phase(name: &str, p: &Profile) {
    if p.steps == 0 {
        return;
    }
    let n = p.steps;
    eprintln!("profile: {name}, {n} step(s), milliseconds per step");
    eprintln!("  layer  kind      read    wait  compute");
    for (i, l) in p.layers.iter().enumerate() {
        eprintln!(
            "  {i:>5}  {:<8} {:>6.2} {:>7.2} {:>8.2}",
            if l.streamed { "streamed" } else { "resident" },
            ms(l.read, n),
            ms(l.wait, n),
            ms(l.compute, n)
        );
    }
    eprintln!(
        "  embed {:.2}  head read {:.2}  head compute {:.2}",
        ms(p.embed, n),
        ms(p.head_read, n),
        ms(p.head_compute, n)
    );
    let e = &p.experts;
    if let Some(rate) = e.hit_rate() {
        let used = e.hits + e.misses;
        eprintln!(
            "  experts per step: {:.1} used, {:.1} read ({}), cache hit rate {:.0}%",
            used as f64 / n as f64,
            e.reads() as f64 / n as f64,
            fmt_bytes(e.bytes_read / n as u64),
            100.0 * rate
        );
    }
    if let Some(p) = e.precision() {
        eprintln!(
            "  expert look-ahead per step: precision {:.0}%, read ahead {:.1} ({}), wasted {}",
            100.0 * p,
            e.read_ahead as f64 / n as f64,
            fmt_bytes(e.ahead_bytes / n as u64),
            fmt_bytes(e.wasted_bytes / n as u64)
        );
    }
    let wall = p.wall.as_secs_f64();
    let wait = p.total_wait().as_secs_f64();
    eprintln!(
        "  total per step: wall {:.2}  read {:.2}  waited for I/O {:.2} ({:.0}% of wall)  compute {:.2}  -> {}",
        ms(p.wall, n),
        ms(p.total_read(), n),
        ms(p.total_wait(), n),
        if wall > 0.0 { 100.0 * wait / wall } else { 0.0 },
        ms(p.total_compute(), n),
        if wait > 0.5 * wall { "I/O-bound" } else { "compute-bound" }
    );
}

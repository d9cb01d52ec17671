//! Gated DeltaNet's two forms and its two ways of taking guesses back, timed on one linear
//! layer of a given shape (Qwen3-Next's by default: 16 key heads, 32 value heads, 128 × 128
//! states, a 4-tap convolution):
//! - prefill of `--tokens` tokens in the chunked form against the recurrent form;
//! - after a verifying step of `--guesses` rows, taking all but one back by replaying the
//!   kept row from the journal, against keeping a checkpoint of the state after every row.
//!
//! usage: cargo run --release --example delta_bench -- [--tokens 2000] [--guesses 8]

use std::time::Instant;

use airllm::kernels::delta::{self, Shape, State, StepInput};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn values(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * scale + offset
        })
        .collect()
}

fn main() {
    let tokens = arg("--tokens", 2000);
    let guesses = arg("--guesses", 8);
    let shape = Shape {
        key_heads: arg("--key-heads", 16),
        value_heads: arg("--value-heads", 32),
        key_dim: arg("--key-dim", 128),
        value_dim: arg("--value-dim", 128),
        kernel: 4,
    };
    let (c, nv) = (shape.channels(), shape.value_heads);
    let conv = values(c * shape.kernel, 1, 0.5, 0.0);
    let qkv = values(tokens * c, 2, 1.0, 0.0);
    let g = values(tokens * nv, 3, 0.5, -0.3);
    let beta = values(tokens * nv, 4, 0.5, 0.5);
    let inp = |from: usize, n: usize| StepInput {
        qkv: &qkv[from * c..(from + n) * c],
        g: &g[from * nv..(from + n) * nv],
        beta: &beta[from * nv..(from + n) * nv],
    };
    let mut out = vec![0f32; tokens * nv * shape.value_dim];
    println!(
        "shape: {} key heads, {} value heads, {} x {} state; {} threads",
        shape.key_heads,
        nv,
        shape.key_dim,
        shape.value_dim,
        rayon::current_num_threads()
    );

    // Prefill: one step of all tokens (chunked), against steps of RECURRENT_MAX rows (each
    // the recurrent form), best of three.
    let best = |f: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let chunked = best(&mut || {
        let mut st = State::new(&shape, 0);
        delta::forward(&shape, &mut st, &conv, &inp(0, tokens), tokens, &mut out);
    });
    let per = delta::RECURRENT_MAX;
    let recurrent = best(&mut || {
        let mut st = State::new(&shape, 0);
        let mut t = 0;
        while t < tokens {
            let n = per.min(tokens - t);
            let o = &mut out[t * nv * shape.value_dim..(t + n) * nv * shape.value_dim];
            delta::forward(&shape, &mut st, &conv, &inp(t, n), n, o);
            t += n;
        }
    });
    println!(
        "prefill of {tokens} tokens: chunked {:.1} ms, recurrent {:.1} ms: chunked is {:.2}x faster",
        chunked * 1e3,
        recurrent * 1e3,
        recurrent / chunked
    );

    // Taking guesses back: the journal (one copy of the state per step, then a replay of the
    // kept rows) against a checkpoint of the state after every guessed row.
    let n = guesses.clamp(2, delta::RECURRENT_MAX);
    let prefilled = |journal: usize| {
        let mut st = State::new(&shape, journal);
        delta::forward(
            &shape,
            &mut st,
            &conv,
            &inp(0, 64),
            64,
            &mut vec![0f32; 64 * nv * shape.value_dim],
        );
        st
    };
    let (mut journal, mut checkpoints) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let mut st = prefilled(n);
        let t = Instant::now();
        delta::forward(&shape, &mut st, &conv, &inp(64, n), n, &mut out);
        assert_eq!(st.truncate(&shape, 65), 65);
        journal = journal.min(t.elapsed().as_secs_f64());

        let mut st = prefilled(0);
        let t = Instant::now();
        let mut kept = Vec::with_capacity(n);
        for r in 0..n {
            delta::forward(&shape, &mut st, &conv, &inp(64 + r, 1), 1, &mut out);
            kept.push(st.s.clone());
        }
        st.s.copy_from_slice(&kept[0]);
        checkpoints = checkpoints.min(t.elapsed().as_secs_f64());
    }
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "verify {n} guesses, keep 1: journal {:.2} ms holding {:.1} MiB, checkpoints {:.2} ms holding {:.1} MiB, per layer",
        journal * 1e3,
        mib(State::max_bytes(&shape, n) as usize - State::max_bytes(&shape, 0) as usize),
        checkpoints * 1e3,
        mib(n * shape.state_len() * 4)
    );
}

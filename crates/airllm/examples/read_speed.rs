//! How fast the reader's path reads a model's matrices with no compute: every layer matrix in
//! slices (32 MiB by default) through `WeightSource::read_rows`, by `LANES` threads taking slices in turn.
//! Run: cargo run --release --example read_speed -- MODEL [LANES] [SLICE_MIB]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use airllm::weights::mat::AlignedBuf;
use airllm::weights::schema::LayerSchema;
use airllm::ModelInfo;

#[global_allocator]
static A: airllm::alloc::LargePageAlloc = airllm::alloc::LargePageAlloc;

fn main() -> airllm::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let info = ModelInfo::open(std::path::Path::new(&args[1]))?;
    let lanes: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let slice_mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let naming = info.src.naming();
    let mut jobs = Vec::new();
    for l in 0..info.cfg.num_layers {
        for t in LayerSchema::new(&info.cfg, l).matrices() {
            let name = t.name(naming, l);
            let rb = info.src.meta(&name).unwrap().buffer_row_bytes() as usize;
            let per = ((slice_mib << 20) / rb).max(1);
            let rows = t.shape[0];
            for s in (0..rows).step_by(per) {
                jobs.push((name.clone(), s, per.min(rows - s)));
            }
        }
    }
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..lanes {
            sc.spawn(|| {
                let mut buf = AlignedBuf::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, s, n)) = jobs.get(i) else {
                        return;
                    };
                    buf = info.src.read_rows(name, *s, *n, buf).unwrap().into_buf();
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let bytes = info.src.io().bytes_read();
    println!(
        "{} slices, {:.2} GB in {secs:.2} s: {:.2} GB/s with {lanes} lanes",
        jobs.len(),
        bytes as f64 / 1e9,
        bytes as f64 / secs / 1e9
    );
    Ok(())
}

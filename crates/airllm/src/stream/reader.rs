//! The background reader. It walks the streamed layers in order, forever, wrapping from the last
//! layer to the first for the next step, and hands each loaded layer to the compute thread.
//!
//! The hand-off channel has no buffer: the reader can finish one layer ahead and then waits, so
//! at most two streamed layers exist at once (the one computing and the one just read), which
//! is what the plan reserved.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::LayerWeights;
use crate::stream::ledger::{Charge, Ledger};
use crate::weights::WeightSource;

pub struct LoadedLayer {
    pub weights: LayerWeights,
    pub read_time: Duration,
    _charge: Charge,
}

pub struct Prefetcher {
    rx: Option<Receiver<Result<LoadedLayer>>>,
    handle: Option<JoinHandle<()>>,
}

/// Reads one layer, charging the budget for it before the bytes exist.
pub fn load_layer(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    ledger: &Arc<Ledger>,
    layer_bytes: u64,
    index: usize,
    device: &Device,
) -> Result<(LayerWeights, Charge, Duration)> {
    let charge = ledger.charge(layer_bytes);
    let t = Instant::now();
    let weights = LayerWeights::load(cfg, src, index, device)?;
    // The plan reserves the largest layer; a layer larger than that would make the ledger
    // fiction.
    if weights.bytes() > layer_bytes {
        return Err(Error::Reader(format!(
            "layer {index} holds {} bytes but the plan reserved {layer_bytes}",
            weights.bytes()
        )));
    }
    Ok((weights, charge, t.elapsed()))
}

impl Prefetcher {
    pub fn spawn(
        cfg: ModelConfig,
        src: Arc<dyn WeightSource>,
        order: Vec<usize>,
        ledger: Arc<Ledger>,
        layer_bytes: u64,
        device: Device,
    ) -> Self {
        let (tx, rx) = sync_channel::<Result<LoadedLayer>>(0);
        let handle = std::thread::Builder::new()
            .name("airllm-reader".into())
            .spawn(move || loop {
                for &i in &order {
                    let msg = load_layer(&cfg, src.as_ref(), &ledger, layer_bytes, i, &device).map(
                        |(weights, charge, read_time)| LoadedLayer {
                            weights,
                            read_time,
                            _charge: charge,
                        },
                    );
                    let failed = msg.is_err();
                    // The receiver is gone when the engine is dropped or restarts the reader.
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the reader thread");
        Prefetcher {
            rx: Some(rx),
            handle: Some(handle),
        }
    }

    /// Waits for the next layer, which must be `expected`.
    pub fn next(&self, expected: usize) -> Result<LoadedLayer> {
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let layer = rx
            .recv()
            .map_err(|_| Error::Reader("the reader thread exited".into()))??;
        if layer.weights.index != expected {
            return Err(Error::Reader(format!(
                "expected layer {expected}, got layer {}",
                layer.weights.index
            )));
        }
        Ok(layer)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver makes the reader's pending send fail, so it exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

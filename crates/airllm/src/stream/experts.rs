//! The expert cache: a mixture-of-experts layer's experts are read only when routing picks
//! them, into a fixed number of slots the plan sizes from the budget, and stay there across
//! tokens until a slot is needed for another expert (least recently used first).
//!
//! Reads run on a thread of their own, so the experts a layer misses are read while its cached
//! ones compute, and each missed expert computes as soon as it arrives. The main reader keeps
//! prefetching the next layer's attention meanwhile, within its own buffers.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::matmul::mat_tensor;
use crate::model::block::Matrices;
use crate::stream::stage::Stager;
use crate::stream::Charge;
use crate::weights::mat::{AlignedBuf, Mat};
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// Counts of the cache's work, summed since the engine opened (or the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    /// Experts a layer used that were already in the cache.
    pub hits: u64,
    /// Experts read from disk.
    pub misses: u64,
    /// Bytes of the experts read.
    pub bytes_read: u64,
}

impl ExpertStats {
    /// Hits over uses, `None` before any use.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
    pub fn since(&self, before: &ExpertStats) -> ExpertStats {
        ExpertStats {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            bytes_read: self.bytes_read - before.bytes_read,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    Loading,
    Ready,
}

struct Slot {
    key: Option<(usize, usize)>,
    state: State,
    /// The expert's matrices (gate, up, down) when ready.
    mats: Vec<Mat>,
    /// Buffers to read the next expert into (a previous occupant's).
    spare: Vec<AlignedBuf>,
    /// Use stamp for least-recently-used eviction.
    used: u64,
    /// Needed by the layer being computed: not to be evicted until it has run.
    pinned: bool,
}

/// Small experts (Qwen3-MoE's are 9 MiB in bf16) are read two at a time, which keeps the disk's
/// queue full across the boundary between experts: 5–10% faster decode on the Qwen3-30B-A3B
/// shape. Large ones (Mixtral's 336 MiB) one at a time, so the first arrives, and computes,
/// sooner: two at a time was 10% slower there.
const SMALL_EXPERT: u64 = 64 << 20;

/// Reads one expert's matrices, all at once, so the disk's queue stays full from the first
/// request of the expert to its last.
fn read_expert(
    src: &dyn WeightSource,
    reads: Vec<(String, usize, usize)>,
    bufs: Vec<AlignedBuf>,
) -> Result<Vec<Mat>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::scope(|sc| {
            let handles: Vec<_> = reads
                .iter()
                .zip(bufs)
                .map(|((name, start, rows), buf)| {
                    sc.spawn(move || src.read_rows(name, *start, *rows, buf))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Reader("reading an expert panicked".into())))
                })
                .collect::<Result<Vec<Mat>>>()
        })
    }))
    .unwrap_or_else(|_| Err(Error::Reader("reading an expert panicked".into())))
}

/// One expert to read into a slot.
struct Job {
    slot: usize,
    reads: Vec<(String, usize, usize)>,
    bufs: Vec<AlignedBuf>,
}

struct Done {
    slot: usize,
    mats: Result<Vec<Mat>>,
}

pub struct ExpertCache {
    src: Arc<dyn WeightSource>,
    schemas: Vec<LayerSchema>,
    slots: Vec<Slot>,
    index: HashMap<(usize, usize), usize>,
    clock: u64,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    handles: Vec<JoinHandle<()>>,
    pub stats: ExpertStats,
    /// Time compute waited for experts being read.
    pub wait: Duration,
    /// An expert was multiplied on the device since the stager last finished its copies.
    unsynced: bool,
    _charge: Charge,
}

impl ExpertCache {
    /// A cache of `slots` experts of up to `expert_bytes` over the sparse layers of `schemas`,
    /// its memory charged as `charge`.
    pub fn new(
        src: Arc<dyn WeightSource>,
        schemas: Vec<LayerSchema>,
        slots: usize,
        expert_bytes: u64,
        charge: Charge,
    ) -> Result<Self> {
        let lanes = if expert_bytes <= SMALL_EXPERT { 2 } else { 1 };
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let jobs = Arc::new(std::sync::Mutex::new(job_rx));
        let handles = (0..lanes)
            .map(|i| {
                let (reader, jobs, done_tx) = (src.clone(), jobs.clone(), done_tx.clone());
                std::thread::Builder::new()
                    .name(format!("airllm-experts-{i}"))
                    .spawn(move || loop {
                        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = job else { return };
                        let mats = read_expert(reader.as_ref(), job.reads, job.bufs);
                        if done_tx
                            .send(Done {
                                slot: job.slot,
                                mats,
                            })
                            .is_err()
                        {
                            return;
                        }
                    })
                    .map_err(|e| Error::Reader(format!("cannot start the expert reader: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ExpertCache {
            src,
            schemas,
            slots: (0..slots)
                .map(|_| Slot {
                    key: None,
                    state: State::Empty,
                    mats: vec![],
                    spare: vec![],
                    used: 0,
                    pinned: false,
                })
                .collect(),
            index: HashMap::new(),
            clock: 0,
            jobs: Some(job_tx),
            done: done_rx,
            handles,
            stats: ExpertStats::default(),
            wait: Duration::ZERO,
            unsynced: false,
            _charge: charge,
        })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Reads every expert of `layers` (when the cache can hold them all), so a model that fits
    /// its budget is resident from the start.
    pub fn preload(&mut self, layers: &[usize]) -> Result<()> {
        for &l in layers {
            let n = self.schemas[l].experts().next().map_or(0, |t| t.experts);
            let all: Vec<usize> = (0..n).collect();
            self.run(l, &all, None, &mut |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Runs `f` for each expert of `experts` in layer `layer` once it is in the cache: hits
    /// first, then misses as they arrive. `stager` multiplies on the compute device.
    pub fn run(
        &mut self,
        layer: usize,
        experts: &[usize],
        mut stager: Option<&mut Stager>,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        if self.slots.is_empty() {
            return Err(Error::Internal(
                "a sparse layer with no expert cache".into(),
            ));
        }
        let roles: Vec<Role> = self.schemas[layer].experts().map(|t| t.role).collect();
        let mut hits = Vec::new();
        let mut pending = VecDeque::new();
        for &e in experts {
            match self.index.get(&(layer, e)) {
                Some(&s) if self.slots[s].state == State::Ready => {
                    self.slots[s].pinned = true;
                    hits.push((e, s));
                }
                Some(_) => {
                    return Err(Error::Internal(format!(
                        "expert {e} of layer {layer} is indexed but not read"
                    )))
                }
                None => pending.push_back(e),
            }
        }
        self.stats.hits += hits.len() as u64;
        self.stats.misses += pending.len() as u64;
        let mut loading: HashMap<usize, usize> = HashMap::new();
        let r = (|| -> Result<()> {
            self.issue(layer, &mut pending, &mut loading, stager.as_deref_mut())?;
            for (e, s) in hits {
                self.compute(s, e, &roles, stager.as_deref_mut(), f)?;
                self.issue(layer, &mut pending, &mut loading, stager.as_deref_mut())?;
            }
            while !loading.is_empty() {
                let t = Instant::now();
                let d = self
                    .done
                    .recv()
                    .map_err(|_| Error::Reader("the expert reader exited".into()))?;
                self.wait += t.elapsed();
                let e = loading
                    .remove(&d.slot)
                    .ok_or_else(|| Error::Internal("an expert arrived unasked".into()))?;
                let slot = &mut self.slots[d.slot];
                match d.mats {
                    Ok(m) => {
                        slot.mats = m;
                        slot.state = State::Ready;
                    }
                    Err(err) => {
                        slot.state = State::Empty;
                        slot.key = None;
                        slot.pinned = false;
                        self.index.remove(&(layer, e));
                        return Err(err);
                    }
                }
                self.compute(d.slot, e, &roles, stager.as_deref_mut(), f)?;
                self.issue(layer, &mut pending, &mut loading, stager.as_deref_mut())?;
            }
            if !pending.is_empty() {
                return Err(Error::Internal("no expert slot could be freed".into()));
            }
            Ok(())
        })();
        if r.is_err() {
            self.abandon(layer, loading);
        }
        r
    }

    /// Starts reads for pending experts while there are slots no expert of this layer still
    /// needs, evicting the least recently used.
    fn issue(
        &mut self,
        layer: usize,
        pending: &mut VecDeque<usize>,
        loading: &mut HashMap<usize, usize>,
        stager: Option<&mut Stager>,
    ) -> Result<()> {
        // A slot computed on a device may still be the source of a copy in flight: those
        // copies finish before any slot is read into again.
        if !pending.is_empty() && self.unsynced {
            if let Some(st) = stager {
                st.finish()?;
            }
            self.unsynced = false;
        }
        while let Some(&e) = pending.front() {
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.pinned && s.state != State::Loading)
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i);
            let Some(v) = victim else { break };
            pending.pop_front();
            let slot = &mut self.slots[v];
            if let Some(k) = slot.key.take() {
                self.index.remove(&k);
            }
            let mut bufs = std::mem::take(&mut slot.spare);
            bufs.extend(
                std::mem::take(&mut slot.mats)
                    .into_iter()
                    .map(Mat::into_buf),
            );
            slot.state = State::Loading;
            slot.pinned = true;
            slot.key = Some((layer, e));
            self.index.insert((layer, e), v);
            let naming = self.src.naming();
            let reads: Vec<(String, usize, usize)> = self.schemas[layer]
                .experts()
                .map(|t| {
                    let (name, start) = t.expert_name(naming, layer, e);
                    (name, start, t.shape[0])
                })
                .collect();
            bufs.resize_with(reads.len(), AlignedBuf::default);
            for (name, _, _) in &reads {
                if let Some(m) = self.src.meta(name) {
                    // GGUF stacks the layer's experts in one tensor.
                    let stacked = if m.shape.len() == 3 { m.shape[0] } else { 1 };
                    self.stats.bytes_read += m.file_bytes / stacked.max(1) as u64;
                }
            }
            // Counted as loading before the send, so a failed send is cleaned up like a
            // failed read.
            loading.insert(v, e);
            let sent = self.jobs.as_ref().is_some_and(|jobs| {
                jobs.send(Job {
                    slot: v,
                    reads,
                    bufs,
                })
                .is_ok()
            });
            if !sent {
                loading.remove(&v);
                let slot = &mut self.slots[v];
                slot.state = State::Empty;
                slot.key = None;
                slot.pinned = false;
                self.index.remove(&(layer, e));
                return Err(Error::Reader("the expert reader exited".into()));
            }
        }
        Ok(())
    }

    fn compute(
        &mut self,
        s: usize,
        e: usize,
        roles: &[Role],
        stager: Option<&mut Stager>,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        self.clock += 1;
        self.unsynced |= stager.is_some();
        let slot = &mut self.slots[s];
        slot.used = self.clock;
        let mut mats = ExpertMats {
            roles,
            mats: &slot.mats,
            stager,
        };
        let r = f(e, &mut mats);
        slot.pinned = false;
        r
    }

    /// After an error: waits for the reads in flight, so none lands in a later call, and
    /// forgets their slots.
    fn abandon(&mut self, layer: usize, loading: HashMap<usize, usize>) {
        for _ in 0..loading.len() {
            if self.done.recv().is_err() {
                break;
            }
        }
        for (s, e) in loading {
            self.index.remove(&(layer, e));
            let slot = &mut self.slots[s];
            slot.state = State::Empty;
            slot.key = None;
            slot.mats.clear();
        }
        for slot in &mut self.slots {
            slot.pinned = false;
        }
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.jobs.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// One cached expert's matrices, multiplied on the CPU or staged to the device.
struct ExpertMats<'a, 'b> {
    roles: &'a [Role],
    mats: &'a [Mat],
    stager: Option<&'b mut Stager>,
}

impl Matrices for ExpertMats<'_, '_> {
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor> {
        let i = self
            .roles
            .iter()
            .position(|r| *r == role)
            .filter(|&i| i < self.mats.len())
            .ok_or_else(|| Error::Internal(format!("an expert has no {role:?}")))?;
        let w = self.mats[i].view();
        match self.stager.as_deref_mut() {
            Some(st) => st.matmul_held(w, x),
            None => mat_tensor(x, w),
        }
    }
}

/// A sparse layer's way to its experts, lent to the layer's [`Matrices`] for one forward.
pub struct ExpertAccess<'a> {
    pub cache: &'a mut ExpertCache,
    pub layer: usize,
}

impl ExpertAccess<'_> {
    /// [`Matrices::experts`] through the cache.
    pub fn run(
        &mut self,
        experts: &[usize],
        stager: Option<&mut Stager>,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        self.cache.run(self.layer, experts, stager, f)
    }
}

/// The error of a sparse layer computed without the cache.
pub fn no_experts() -> Error {
    Error::Internal("a sparse layer was given no expert cache".into())
}

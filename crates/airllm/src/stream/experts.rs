//! The expert cache: a mixture-of-experts layer's experts are read only when routing picks
//! them, into a fixed number of slots the plan sizes from the budget, and stay there across
//! tokens until a slot is needed for another expert (least recently used first).
//!
//! Reads run on a thread of their own, so the experts a layer misses are read while its cached
//! ones compute, and each missed expert computes as soon as it arrives. The main reader keeps
//! prefetching the next layer's attention meanwhile, within its own buffers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::matmul::mat_tensor;
use crate::model::block::Matrices;
use crate::stream::lookahead::Lookahead;
use crate::stream::stage::Stager;
use crate::stream::Charge;
use crate::weights::mat::{AlignedBuf, Mat};
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// Counts of the cache's work, summed since the engine opened (or the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    /// Experts a layer used that were already in the cache, or on their way from a guess.
    pub hits: u64,
    /// Experts a layer used that had to be read then.
    pub misses: u64,
    /// Bytes of the experts read, read-ahead included.
    pub bytes_read: u64,
    /// Look-ahead: experts guessed for a layer before its router ran (read or not), and how
    /// many of them the layer then used.
    pub guessed: u64,
    pub guessed_right: u64,
    /// Experts read on a guess, their bytes, and the bytes of those the layer did not use.
    pub read_ahead: u64,
    pub ahead_bytes: u64,
    pub wasted_bytes: u64,
}

impl ExpertStats {
    /// Hits over uses, `None` before any use.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
    /// Right guesses over guesses, `None` before any guess was scored.
    pub fn precision(&self) -> Option<f64> {
        (self.guessed > 0).then(|| self.guessed_right as f64 / self.guessed as f64)
    }
    /// Experts read from disk, on a miss or a guess.
    pub fn reads(&self) -> u64 {
        self.misses + self.read_ahead
    }
    pub fn since(&self, before: &ExpertStats) -> ExpertStats {
        ExpertStats {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            bytes_read: self.bytes_read - before.bytes_read,
            guessed: self.guessed - before.guessed,
            guessed_right: self.guessed_right - before.guessed_right,
            read_ahead: self.read_ahead - before.read_ahead,
            ahead_bytes: self.ahead_bytes - before.ahead_bytes,
            wasted_bytes: self.wasted_bytes - before.wasted_bytes,
        }
    }
}

impl std::ops::AddAssign for ExpertStats {
    fn add_assign(&mut self, o: ExpertStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.bytes_read += o.bytes_read;
        self.guessed += o.guessed;
        self.guessed_right += o.guessed_right;
        self.read_ahead += o.read_ahead;
        self.ahead_bytes += o.ahead_bytes;
        self.wasted_bytes += o.wasted_bytes;
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
    took: Duration,
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
    /// Guesses of the next sparse layer's experts, when the plan has room for the routers.
    look: Option<Lookahead>,
    look_charge: Option<Charge>,
    /// Guessed experts waiting for a slot, and those read on a guess for a layer that has not
    /// run yet (with their bytes): another guess does not evict them.
    queue: VecDeque<(usize, usize)>,
    ahead: HashMap<(usize, usize), u64>,
    /// The last sparse layer to run, and when it had the last of its own experts.
    own_done: Option<(usize, Instant)>,
    /// Where each sparse layer's choice is written, one JSON line each, and the step count.
    trace: Option<Trace>,
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
                        let t = Instant::now();
                        let mats = read_expert(reader.as_ref(), job.reads, job.bufs);
                        if done_tx
                            .send(Done {
                                slot: job.slot,
                                mats,
                                took: t.elapsed(),
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
            look: None,
            look_charge: None,
            queue: VecDeque::new(),
            ahead: HashMap::new(),
            own_done: None,
            trace: None,
            _charge: charge,
        })
    }

    /// Writes each sparse layer's choice to `path` from now on.
    pub fn trace_to(&mut self, path: &std::path::Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .map_err(|e| Error::file(path, format!("cannot create the expert trace: {e}")))?;
        self.trace = Some(Trace {
            path: path.to_path_buf(),
            out: std::io::BufWriter::new(f),
            step: 0,
            last: None,
        });
        Ok(())
    }

    /// Turns on look-ahead's guesses (the plan charged their routers' copies as `charge`).
    pub fn set_lookahead(&mut self, look: Lookahead, charge: Charge) {
        self.look = Some(look);
        self.look_charge = Some(charge);
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
            self.run(l, &all, None, None, &mut |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Runs `f` for each expert of `experts` in layer `layer` once it is in the cache: hits
    /// first, then misses as they arrive. `stager` multiplies on the compute device. From
    /// `input`, the layer's MoE input, the next sparse layer's experts are guessed and, where
    /// the guesses pay, read once this layer's own misses are under way.
    pub fn run(
        &mut self,
        layer: usize,
        experts: &[usize],
        input: Option<&Tensor>,
        mut stager: Option<&mut Stager>,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        if self.slots.is_empty() {
            return Err(Error::Internal(
                "a sparse layer with no expert cache".into(),
            ));
        }
        if let (Some(t), Some(_)) = (self.trace.as_mut(), input) {
            t.write(layer, experts)?;
        }
        self.settle_guesses(layer, experts);
        let roles: Vec<Role> = self.schemas[layer].experts().map(|t| t.role).collect();
        let mut hits = Vec::new();
        let mut pending = VecDeque::new();
        // Slots of this layer's experts being read (on a miss, or on an earlier guess).
        let mut waiting = HashSet::new();
        for &e in experts {
            match self.index.get(&(layer, e)) {
                Some(&s) => {
                    self.slots[s].pinned = true;
                    match self.slots[s].state {
                        State::Ready => hits.push((e, s)),
                        _ => {
                            waiting.insert(s);
                        }
                    }
                }
                None => pending.push_back(e),
            }
        }
        self.stats.hits += (hits.len() + waiting.len()) as u64;
        self.stats.misses += pending.len() as u64;
        let r = (|| -> Result<()> {
            self.issue(layer, &mut pending, &mut waiting, stager.as_deref_mut())?;
            if let (Some(x), Some(look)) = (input, self.look.as_mut()) {
                match look.guess(layer, x, self.slots.len()) {
                    Ok(Some((next, guess, true))) => {
                        for e in guess {
                            let key = (next, e);
                            match self.index.get(&key) {
                                // Already cached: kept from other guesses' eviction, as if
                                // read ahead (for nothing).
                                Some(&s) => {
                                    self.clock += 1;
                                    self.slots[s].used = self.clock;
                                    self.ahead.entry(key).or_insert(0);
                                }
                                None => self.queue.push_back(key),
                            }
                        }
                    }
                    Ok(_) => {}
                    // A guess that cannot be made costs the step nothing: look-ahead stops.
                    Err(e) => {
                        tracing::warn!("expert look-ahead turned off: {e}");
                        self.look = None;
                    }
                }
            }
            if waiting.is_empty() && pending.is_empty() {
                self.own_done = Some((layer, Instant::now()));
            }
            self.issue(layer, &mut pending, &mut waiting, stager.as_deref_mut())?;
            for (e, s) in hits {
                self.compute(s, e, &roles, stager.as_deref_mut(), f)?;
                self.issue(layer, &mut pending, &mut waiting, stager.as_deref_mut())?;
            }
            while !waiting.is_empty() || !pending.is_empty() {
                if waiting.is_empty() && !self.slots.iter().any(|s| s.state == State::Loading) {
                    return Err(Error::Internal("no expert slot could be freed".into()));
                }
                let (s, failed) = self.receive()?;
                if !waiting.remove(&s) {
                    // Read on a guess (for this layer or a later one): it stays in the cache,
                    // and its slot may take one of this layer's misses.
                    self.issue(layer, &mut pending, &mut waiting, stager.as_deref_mut())?;
                    continue;
                }
                if let Some(err) = failed {
                    return Err(err);
                }
                if waiting.is_empty() && pending.is_empty() {
                    self.own_done = Some((layer, Instant::now()));
                }
                let e = self.slots[s].key.map_or(usize::MAX, |k| k.1);
                self.compute(s, e, &roles, stager.as_deref_mut(), f)?;
                self.issue(layer, &mut pending, &mut waiting, stager.as_deref_mut())?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.abandon();
        }
        r
    }

    /// Before `layer` runs: scores the guess made for it, counts the bytes read on that guess
    /// that it does not use, and lets those experts be evicted like any other. Guesses still
    /// waiting for a slot are dropped, and the window the disk had before this router chose
    /// is timed.
    fn settle_guesses(&mut self, layer: usize, experts: &[usize]) {
        self.queue.clear();
        let Some(look) = self.look.as_mut() else {
            return;
        };
        if let Some((prev, t)) = self.own_done.take() {
            if look.next(prev) == Some(layer) {
                look.gap(t.elapsed());
            }
        }
        if let Some((g, r)) = look.score(layer, experts) {
            self.stats.guessed += g;
            self.stats.guessed_right += r;
        }
        let stats = &mut self.stats;
        self.ahead.retain(|&(l, e), bytes| {
            if l == layer && !experts.contains(&e) {
                stats.wasted_bytes += *bytes;
            }
            l != layer
        });
    }

    /// Waits for the next read to finish and files it in its slot: `(slot, the read's error)`.
    fn receive(&mut self) -> Result<(usize, Option<Error>)> {
        let t = Instant::now();
        let d = self
            .done
            .recv()
            .map_err(|_| Error::Reader("the expert reader exited".into()))?;
        self.wait += t.elapsed();
        let slot = self
            .slots
            .get_mut(d.slot)
            .filter(|s| s.state == State::Loading)
            .ok_or_else(|| Error::Internal("an expert arrived unasked".into()))?;
        match d.mats {
            Ok(m) => {
                slot.mats = m;
                slot.state = State::Ready;
                if let Some(look) = self.look.as_mut() {
                    look.read_took(d.took);
                }
                Ok((d.slot, None))
            }
            Err(err) => {
                slot.state = State::Empty;
                slot.pinned = false;
                if let Some(k) = slot.key.take() {
                    self.index.remove(&k);
                    self.ahead.remove(&k);
                }
                Ok((d.slot, Some(err)))
            }
        }
    }

    /// Starts reads for pending experts while there are slots no expert of this layer still
    /// needs, evicting the least recently used; then, with all of this layer's misses under
    /// way, the guessed experts, into slots that hold neither this layer's experts nor other
    /// guesses.
    fn issue(
        &mut self,
        layer: usize,
        pending: &mut VecDeque<usize>,
        waiting: &mut HashSet<usize>,
        mut stager: Option<&mut Stager>,
    ) -> Result<()> {
        while let Some(&e) = pending.front() {
            let Some(v) = self.victim(false) else { break };
            self.sync(stager.as_deref_mut())?;
            pending.pop_front();
            waiting.insert(v);
            self.start(v, (layer, e), true)?;
        }
        while pending.is_empty() {
            let Some(&key) = self.queue.front() else {
                break;
            };
            if self.index.contains_key(&key) {
                self.queue.pop_front();
                continue;
            }
            let Some(v) = self.victim(true) else { break };
            self.sync(stager.as_deref_mut())?;
            self.queue.pop_front();
            let bytes = self.start(v, key, false)?;
            self.ahead.insert(key, bytes);
            self.stats.read_ahead += 1;
            self.stats.ahead_bytes += bytes;
        }
        Ok(())
    }

    /// A slot computed on a device may still be the source of a copy in flight: those copies
    /// finish before any slot is read into again.
    fn sync(&mut self, stager: Option<&mut Stager>) -> Result<()> {
        if self.unsynced {
            if let Some(st) = stager {
                st.finish()?;
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// The least recently used slot that no running layer needs and no read fills; for a
    /// guess, not one that holds another guess either.
    fn victim(&self, for_guess: bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.pinned && s.state != State::Loading)
            .filter(|(_, s)| !for_guess || !s.key.is_some_and(|k| self.ahead.contains_key(&k)))
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Reads expert `key` into slot `v` (its occupant evicted), for the layer running now
    /// (`own`, pinned until it computes) or on a guess. Returns the bytes it reads.
    fn start(&mut self, v: usize, key: (usize, usize), own: bool) -> Result<u64> {
        let slot = &mut self.slots[v];
        if let Some(k) = slot.key.take() {
            self.index.remove(&k);
            // Read on a guess and evicted before its layer ran: wasted.
            self.stats.wasted_bytes += self.ahead.remove(&k).unwrap_or(0);
        }
        let mut bufs = std::mem::take(&mut slot.spare);
        bufs.extend(
            std::mem::take(&mut slot.mats)
                .into_iter()
                .map(Mat::into_buf),
        );
        slot.state = State::Loading;
        slot.pinned = own;
        slot.key = Some(key);
        self.clock += 1;
        slot.used = self.clock;
        self.index.insert(key, v);
        let (layer, e) = key;
        let naming = self.src.naming();
        let reads: Vec<(String, usize, usize)> = self.schemas[layer]
            .experts()
            .map(|t| {
                let (name, start) = t.expert_name(naming, layer, e);
                (name, start, t.shape[0])
            })
            .collect();
        bufs.resize_with(reads.len(), AlignedBuf::default);
        let mut bytes = 0;
        for (name, _, _) in &reads {
            if let Some(m) = self.src.meta(name) {
                // GGUF stacks the layer's experts in one tensor.
                let stacked = if m.shape.len() == 3 { m.shape[0] } else { 1 };
                bytes += m.file_bytes / stacked.max(1) as u64;
            }
        }
        self.stats.bytes_read += bytes;
        let sent = self.jobs.as_ref().is_some_and(|jobs| {
            jobs.send(Job {
                slot: v,
                reads,
                bufs,
            })
            .is_ok()
        });
        if !sent {
            let slot = &mut self.slots[v];
            slot.state = State::Empty;
            slot.key = None;
            slot.pinned = false;
            self.index.remove(&key);
            return Err(Error::Reader("the expert reader exited".into()));
        }
        Ok(bytes)
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
    /// forgets them and every guess.
    fn abandon(&mut self) {
        while self.slots.iter().any(|s| s.state == State::Loading) {
            let Ok(d) = self.done.recv() else { break };
            if let Some(slot) = self.slots.get_mut(d.slot) {
                if let Some(k) = slot.key.take() {
                    self.index.remove(&k);
                }
                slot.state = State::Empty;
                slot.mats.clear();
            }
        }
        for slot in &mut self.slots {
            slot.pinned = false;
        }
        self.ahead.clear();
        self.queue.clear();
        self.own_done = None;
        if let Some(look) = self.look.as_mut() {
            look.forget_open();
        }
    }
}

/// A routing trace: for each sparse layer a step runs, `{"step", "layer", "experts"}`.
struct Trace {
    path: std::path::PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    step: u64,
    last: Option<usize>,
}

impl Trace {
    fn write(&mut self, layer: usize, experts: &[usize]) -> Result<()> {
        use std::io::Write;
        // Layers run in order: one that is not after the last begins a step.
        if self.last.is_some_and(|l| layer <= l) {
            self.step += 1;
        }
        self.last = Some(layer);
        let line = serde_json::json!({"step": self.step, "layer": layer, "experts": experts});
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::file(&self.path, format!("cannot write the expert trace: {e}")))
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
        input: &Tensor,
        stager: Option<&mut Stager>,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        self.cache.run(self.layer, experts, Some(input), stager, f)
    }
}

/// The error of a sparse layer computed without the cache.
pub fn no_experts() -> Error {
    Error::Internal("a sparse layer was given no expert cache".into())
}

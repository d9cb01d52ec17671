//! The background reader. Each step it walks the streamed layers in order, reading each layer's
//! small tensors and then its matrices in row slices sized by the plan, then (when the step
//! wants logits and the head is not resident) the output head in slices. It runs ahead of
//! compute as far as the buffer pool allows, across layer and step boundaries, so the prefetch
//! depth is the number of buffers the plan could afford.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::matmul::{matmul_into, with_rows};
use crate::model::block::{Matrices, Small};
use crate::stream::experts::{no_experts, ExpertAccess};
use crate::stream::pool::Pool;
use crate::stream::stage::{cat_columns, slice_rows, Stager};
use crate::weights::mat::Mat;
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// Which matrix a slice belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Layer(usize, Role),
    Head,
}

/// Rows `start..` of a matrix in a pool buffer, returned to the pool when dropped.
pub struct Slice {
    pub target: Target,
    pub start: usize,
    mat: Option<Mat>,
    pool: Arc<Pool>,
}

impl Slice {
    pub fn mat(&self) -> &Mat {
        self.mat.as_ref().expect("present until drop")
    }
}

impl crate::device::ReadRows for Slice {
    fn view(&self) -> crate::weights::mat::MatView<'_> {
        self.mat().view()
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        if let Some(m) = self.mat.take() {
            self.pool.put(m.into_buf());
        }
    }
}

pub enum Piece {
    /// A layer's norms and biases (they come before its first matrix).
    Small(usize, Small),
    Rows(Slice),
}

/// A piece and how long the reader took to read it.
pub struct Delivered {
    pub piece: Piece,
    pub read: Duration,
}

/// One read the reader makes.
#[derive(Debug, Clone)]
enum Item {
    Small(usize),
    Rows {
        target: Target,
        name: String,
        start: usize,
        rows: usize,
    },
}

/// What the reader reads each step.
pub struct ReadSpec {
    /// Every layer's schema, by layer index.
    pub schemas: Vec<LayerSchema>,
    pub layers: Vec<usize>,
    /// The head's tensor name and rows, when the head is streamed.
    pub head: Option<(String, usize)>,
    pub slice_bytes: u64,
    pub norm_offset: f32,
    pub device: Device,
}

impl ReadSpec {
    fn rows_items(
        src: &dyn WeightSource,
        target: Target,
        name: String,
        rows: usize,
        slice_bytes: u64,
    ) -> Result<Vec<Item>> {
        let m = src
            .meta(&name)
            .ok_or_else(|| Error::tensor(src.path(), &name, "missing from the checkpoint"))?;
        let per = slice_rows(slice_bytes, m.buffer_row_bytes(), rows);
        Ok((0..rows)
            .step_by(per)
            .map(|start| Item::Rows {
                target,
                name: name.clone(),
                start,
                rows: per.min(rows - start),
            })
            .collect())
    }

    /// The reads of one step: the layers', and the head's.
    fn items(&self, src: &dyn WeightSource) -> Result<(Vec<Item>, Vec<Item>)> {
        let naming = src.naming();
        let mut layers = Vec::new();
        for &l in &self.layers {
            layers.push(Item::Small(l));
            for t in self.schemas[l].matrices() {
                layers.extend(Self::rows_items(
                    src,
                    Target::Layer(l, t.role),
                    t.name(naming, l),
                    t.shape[0],
                    self.slice_bytes,
                )?);
            }
        }
        let head = match &self.head {
            Some((name, rows)) => {
                Self::rows_items(src, Target::Head, name.clone(), *rows, self.slice_bytes)?
            }
            None => vec![],
        };
        Ok((layers, head))
    }
}

/// Reads run in this many lanes at once, so the next slice's requests are queued while the
/// current slice's last ones finish and the disk never idles between slices.
const LANES: usize = 2;

/// The reader: a dispatcher (this thread) takes a buffer for each read in order, `LANES`
/// threads read, and a collector passes the pieces to compute in order. Buffers are taken in
/// order and returned in order, so the lanes can never hold every buffer while an earlier read
/// waits for one.
fn read_loop<'a>(
    spec: &ReadSpec,
    src: &dyn WeightSource,
    pool: &Arc<Pool>,
    layer_items: &'a [Item],
    head_items: &'a [Item],
    cmd_rx: &Receiver<bool>,
    tx: &Sender<Result<Delivered>>,
) {
    type Job<'a> = (usize, &'a Item, Option<crate::weights::mat::AlignedBuf>);
    let (job_tx, job_rx) = channel::<Job<'a>>();
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = channel::<(usize, Result<Delivered>)>();
    std::thread::scope(|s| {
        for _ in 0..LANES {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            s.spawn(move || loop {
                let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((i, item, buf)) = job else { return };
                let t = Instant::now();
                // A panic here would leave compute waiting for piece `i` forever: it becomes
                // an error for that piece instead.
                let read = std::panic::AssertUnwindSafe(|| match (item, buf) {
                    (Item::Small(l), _) => {
                        Small::load(&spec.schemas[*l], src, *l, spec.norm_offset, &spec.device)
                            .map(|s| Piece::Small(*l, s))
                    }
                    (
                        Item::Rows {
                            target,
                            name,
                            start,
                            rows,
                        },
                        Some(buf),
                    ) => src.read_rows(name, *start, *rows, buf).and_then(|mat| {
                        if mat.bytes() > pool.buf_bytes() as u64 {
                            return Err(Error::Reader(format!(
                                "{name}: a slice of {rows} rows took {} bytes, more than the planned buffer of {}",
                                mat.bytes(),
                                pool.buf_bytes()
                            )));
                        }
                        Ok(Piece::Rows(Slice {
                            target: *target,
                            start: *start,
                            mat: Some(mat),
                            pool: pool.clone(),
                        }))
                    }),
                    (Item::Rows { .. }, None) => unreachable!("row reads are given a buffer"),
                });
                let piece = std::panic::catch_unwind(read).unwrap_or_else(|_| {
                    Err(Error::Reader(format!("reading {item:?} panicked")))
                });
                let msg = piece.map(|piece| Delivered {
                    piece,
                    read: t.elapsed(),
                });
                if done_tx.send((i, msg)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        // The collector: pieces go to compute in the order they were dispatched.
        s.spawn(move || {
            let mut waiting = std::collections::BTreeMap::new();
            let mut next = 0usize;
            for (i, msg) in done_rx.iter() {
                waiting.insert(i, msg);
                while let Some(msg) = waiting.remove(&next) {
                    next += 1;
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            }
        });
        let mut n = 0usize;
        let mut dispatch = |item: &'a Item| -> bool {
            let buf = match item {
                Item::Small(_) => None,
                Item::Rows { .. } => match pool.get() {
                    Some(b) => Some(b),
                    None => return false,
                },
            };
            n += 1;
            job_tx.send((n - 1, item, buf)).is_ok()
        };
        'steps: loop {
            for item in layer_items {
                if !dispatch(item) {
                    break 'steps;
                }
            }
            if head_items.is_empty() {
                continue;
            }
            // The head is read only for steps that want logits; the engine says so at the
            // start of each step.
            match cmd_rx.recv() {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => break,
            }
            for item in head_items {
                if !dispatch(item) {
                    break 'steps;
                }
            }
        }
        drop(job_tx);
    });
}

pub struct Prefetcher {
    rx: Option<Receiver<Result<Delivered>>>,
    /// One message per step: whether it reads the head.
    cmd: Option<Sender<bool>>,
    pool: Arc<Pool>,
    handle: Option<JoinHandle<()>>,
    head_streamed: bool,
}

impl Prefetcher {
    pub fn spawn(spec: ReadSpec, src: Arc<dyn WeightSource>, pool: Arc<Pool>) -> Result<Self> {
        let (layer_items, head_items) = spec.items(src.as_ref())?;
        let head_streamed = !head_items.is_empty();
        let (tx, rx) = channel::<Result<Delivered>>();
        let (cmd_tx, cmd_rx) = channel::<bool>();
        let pool2 = pool.clone();
        let handle = std::thread::Builder::new()
            .name("airllm-reader".into())
            .spawn(move || {
                read_loop(
                    &spec,
                    src.as_ref(),
                    &pool2,
                    &layer_items,
                    &head_items,
                    &cmd_rx,
                    &tx,
                )
            })
            .map_err(|e| Error::Reader(format!("cannot start the reader thread: {e}")))?;
        Ok(Prefetcher {
            rx: Some(rx),
            cmd: Some(cmd_tx),
            pool,
            handle: Some(handle),
            head_streamed,
        })
    }

    /// Tells the reader whether this step reads the head. Called once at the start of every
    /// step.
    pub fn begin_step(&self, wants_head: bool) {
        if self.head_streamed {
            if let Some(c) = &self.cmd {
                let _ = c.send(wants_head);
            }
        }
    }

    /// The next piece, and how long compute waited for it.
    pub fn next(&self) -> Result<(Delivered, Duration)> {
        let t = Instant::now();
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let d = rx
            .recv()
            .map_err(|_| Error::Reader("the reader thread exited".into()))??;
        Ok((d, t.elapsed()))
    }

    /// Waits for layer `layer`'s small tensors.
    pub fn small(&self, layer: usize) -> Result<(Small, Duration, Duration)> {
        let (d, wait) = self.next()?;
        match d.piece {
            Piece::Small(l, s) if l == layer => Ok((s, d.read, wait)),
            Piece::Small(l, _) => Err(Error::Reader(format!(
                "expected layer {layer}, got layer {l}"
            ))),
            Piece::Rows(s) => Err(Error::Reader(format!(
                "expected layer {layer}'s norms, got a slice of {:?}",
                s.target
            ))),
        }
    }

    /// The next slice, which must be rows from `done` of `target`, with its read and wait
    /// times.
    fn next_slice(&self, target: Target, done: usize) -> Result<(Slice, Duration, Duration)> {
        let (d, wait) = self.next()?;
        let Piece::Rows(s) = d.piece else {
            return Err(Error::Reader(format!(
                "expected a slice of {target:?}, got a layer's norms"
            )));
        };
        if s.target != target || s.start != done {
            return Err(Error::Reader(format!(
                "expected rows from {done} of {target:?}, got rows from {} of {:?}",
                s.start, s.target
            )));
        }
        Ok((s, d.read, wait))
    }

    /// Calls `f(start, slice)` for each slice of a streamed matrix of `rows` rows, in order,
    /// as the slices arrive. Returns the read and wait times.
    pub fn rows(
        &self,
        target: Target,
        rows: usize,
        f: &mut dyn FnMut(usize, crate::weights::mat::MatView) -> Result<()>,
    ) -> Result<(Duration, Duration)> {
        let (mut read, mut wait) = (Duration::ZERO, Duration::ZERO);
        let mut done = 0;
        while done < rows {
            let (s, r, w) = self.next_slice(target, done)?;
            read += r;
            wait += w;
            let v = s.mat().view();
            f(done, v)?;
            done += v.rows;
        }
        Ok((read, wait))
    }

    /// `x Wᵀ` for a streamed matrix of `rows` output rows, computed slice by slice as the
    /// slices arrive: on the CPU, or on the device through `stager`. Returns the product and
    /// the read and wait times.
    pub fn matmul(
        &self,
        target: Target,
        rows: usize,
        x: &Tensor,
        stager: Option<&mut Stager>,
    ) -> Result<(Tensor, Duration, Duration)> {
        let (mut read, mut wait) = (Duration::ZERO, Duration::ZERO);
        if let Some(stager) = stager {
            let mut outs = Vec::new();
            let mut done = 0;
            while done < rows {
                let (s, r, w) = self.next_slice(target, done)?;
                read += r;
                wait += w;
                done += s.mat().rows;
                outs.push(stager.matmul_read(Box::new(s), x)?);
            }
            return Ok((cat_columns(outs)?, read, wait));
        }
        let y = with_rows(x, rows, |xs, m, y| {
            (read, wait) = self.rows(target, rows, &mut |done, v| {
                matmul_into(xs, m, v, y, rows, done)
            })?;
            Ok(())
        })?;
        Ok((y, read, wait))
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the pool, the piece channel and the command channel wakes the reader
        // wherever it waits, so it exits.
        self.pool.close();
        self.rx.take();
        self.cmd.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The matrices of a streamed layer: each product pulls its slices from the reader.
pub struct StreamedMats<'a> {
    pub reader: &'a Prefetcher,
    /// Where the products run when computing on a device.
    pub stager: Option<&'a mut Stager>,
    pub schema: &'a LayerSchema,
    pub layer: usize,
    /// A sparse layer's experts.
    pub experts: Option<ExpertAccess<'a>>,
    pub read: Duration,
    pub wait: Duration,
}

impl Matrices for StreamedMats<'_> {
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor> {
        let rows = self
            .schema
            .get(role)
            .map(|t| t.shape[0])
            .ok_or_else(|| Error::Internal(format!("the layer has no {role:?}")))?;
        let (y, read, wait) = self.reader.matmul(
            Target::Layer(self.layer, role),
            rows,
            x,
            self.stager.as_deref_mut(),
        )?;
        self.read += read;
        self.wait += wait;
        Ok(y)
    }

    fn rows(
        &mut self,
        role: Role,
        f: &mut dyn FnMut(usize, crate::weights::mat::MatView) -> Result<()>,
    ) -> Result<()> {
        // The slices are in host memory either way: the absorbed products run on the CPU.
        let rows = self
            .schema
            .get(role)
            .map(|t| t.shape[0])
            .ok_or_else(|| Error::Internal(format!("the layer has no {role:?}")))?;
        let (read, wait) = self.reader.rows(Target::Layer(self.layer, role), rows, f)?;
        self.read += read;
        self.wait += wait;
        Ok(())
    }

    fn experts(
        &mut self,
        experts: &[usize],
        input: &Tensor,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        let access = self.experts.as_mut().ok_or_else(no_experts)?;
        access.run(experts, input, self.stager.as_deref_mut(), f)
    }
}

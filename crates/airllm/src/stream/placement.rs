//! Placement: which tier holds each layer and the output head while generating (the device's
//! memory, host memory, or the disk it is read from for every token), as the plan decided, and
//! loading what is held, each charged to its tier's ledger.

use std::sync::Arc;

use candle_core::Device;

use crate::device::DevMat;
use crate::error::{Error, Result};
use crate::model::block::Small;
use crate::stream::{Charge, HeldLayer, Ledger, Plan};
use crate::weights::mat::AlignedBuf;
use crate::weights::schema::LayerSchema;
use crate::weights::WeightSource;

/// Where a layer's or the head's matrices are held while generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the compute device's memory (a GPU's, or a simulated one's).
    Device,
    /// In host memory; on a GPU, copied over through the staging slots when used.
    Host,
    /// Read from disk in slices each time it is used.
    Disk,
}

impl Placement {
    /// Where the plan puts layer `i`: the device tier's layers come first, then the host's.
    pub fn of_layer(plan: &Plan, i: usize) -> Placement {
        let on_device = plan.device.as_ref().map_or(0, |d| d.resident_layers);
        if i < on_device {
            Placement::Device
        } else if i < on_device + plan.resident_layers {
            Placement::Host
        } else {
            Placement::Disk
        }
    }

    /// Where the plan puts the output head.
    pub fn of_head(plan: &Plan) -> Placement {
        match &plan.device {
            Some(d) if d.head_resident => Placement::Device,
            _ if plan.head_resident => Placement::Host,
            _ => Placement::Disk,
        }
    }
}

/// What the plan keeps resident, loaded.
pub struct Placed {
    /// The head, unless it is read from disk.
    pub head: Option<DevMat>,
    /// Each layer held in memory (device or host), `None` for streamed ones.
    pub resident: Vec<Option<HeldLayer>>,
    /// Norms and biases of the streamed layers, kept on a GPU so none are copied per token.
    pub device_small: Vec<Option<Small>>,
    /// Charges for what is held, released with the engine.
    pub held: Vec<Charge>,
}

/// Where the weights come from and what the plan says to hold.
pub struct Placer<'a> {
    pub src: &'a dyn WeightSource,
    pub schemas: &'a [LayerSchema],
    pub head_name: &'a str,
    pub norm_offset: f32,
    pub plan: &'a Plan,
    pub device: &'a Device,
    /// The host tier's matrices pass through staging slots to reach the device (they stay on
    /// the CPU); without staging they are held where the compute is.
    pub staged: bool,
    pub ledger: &'a Arc<Ledger>,
    pub device_ledger: Option<&'a Arc<Ledger>>,
}

impl Placer<'_> {
    /// Loads the head and the held layers into their tiers.
    pub fn load(&self) -> Result<Placed> {
        let plan = self.plan;
        let host = Device::Cpu;
        // Matrices of the host tier stay on the CPU when a device computes through a link.
        let host_tier = if self.staged { &host } else { self.device };
        // A GPU's resident matrices are read in chunks through one buffer: the room of the
        // read buffers, which are not allocated yet.
        let chunk = if plan.slice_bytes > 0 {
            plan.slice_bytes
        } else {
            32 << 20
        };
        let mut scratch = AlignedBuf::default();
        let mut held = Vec::new();
        let charge = |at: Placement, bytes: u64| match (at, self.device_ledger) {
            (Placement::Device, Some(dl)) => dl.charge(bytes),
            _ => self.ledger.charge(bytes),
        };
        let at = Placement::of_head(plan);
        let head = match at {
            Placement::Disk => None,
            _ => {
                let (on, bytes) = match at {
                    Placement::Device => (
                        self.device,
                        plan.device.as_ref().map_or(0, |d| d.head_bytes),
                    ),
                    _ => (host_tier, plan.head_bytes),
                };
                held.push(charge(at, bytes));
                Some(DevMat::load(
                    self.src,
                    self.head_name,
                    on,
                    chunk,
                    &mut scratch,
                )?)
            }
        };
        let mut resident = Vec::with_capacity(self.schemas.len());
        let mut device_small = Vec::with_capacity(self.schemas.len());
        for (i, schema) in self.schemas.iter().enumerate() {
            let at = Placement::of_layer(plan, i);
            device_small.push(if at == Placement::Disk && !self.device.is_cpu() {
                Some(Small::load(
                    schema,
                    self.src,
                    i,
                    self.norm_offset,
                    self.device,
                )?)
            } else {
                None
            });
            if at == Placement::Disk {
                resident.push(None);
                continue;
            }
            held.push(charge(at, plan.layer_bytes));
            let mat_device = if at == Placement::Device {
                self.device
            } else {
                host_tier
            };
            let l = HeldLayer::load(
                schema,
                self.src,
                i,
                self.norm_offset,
                self.device,
                mat_device,
                chunk,
                &mut scratch,
            )?;
            // The plan reserves the largest layer; a layer larger than that would make the
            // ledger fiction.
            if l.bytes() > plan.layer_bytes {
                return Err(Error::Internal(format!(
                    "layer {i} holds {} bytes but the plan reserved {}",
                    l.bytes(),
                    plan.layer_bytes
                )));
            }
            resident.push(Some(l));
        }
        Ok(Placed {
            head,
            resident,
            device_small,
            held,
        })
    }
}

//! Residency: layers and the output head that the plan keeps in memory for the engine's life,
//! held in the file's form, on the compute device or in host memory.

use candle_core::{Device, Tensor};

use crate::device::DevMat;
use crate::error::{Error, Result};
use crate::model::block::{Matrices, Small};
use crate::stream::experts::{no_experts, ExpertAccess};
use crate::stream::stage::Stager;
use crate::weights::mat::{AlignedBuf, MatView};
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// A decoder layer held whole.
pub struct HeldLayer {
    pub small: Small,
    mats: Vec<(Role, DevMat)>,
}

impl HeldLayer {
    /// Reads layer `layer`, its norms and biases onto `device` and its matrices onto
    /// `mat_device` (the compute device, or the CPU for the host tier).
    /// A GPU's matrices are copied `chunk_bytes` of rows at a time through `scratch`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        schema: &LayerSchema,
        src: &dyn WeightSource,
        layer: usize,
        norm_offset: f32,
        device: &Device,
        mat_device: &Device,
        chunk_bytes: u64,
        scratch: &mut AlignedBuf,
    ) -> Result<Self> {
        let naming = src.naming();
        Ok(HeldLayer {
            small: Small::load(schema, src, layer, norm_offset, device)?,
            mats: schema
                .matrices()
                .map(|t| {
                    let name = t.name(naming, layer);
                    Ok((
                        t.role,
                        DevMat::load(src, &name, mat_device, chunk_bytes, scratch)?,
                    ))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.small.bytes() + self.mats.iter().map(|(_, m)| m.bytes()).sum::<u64>()
    }

    fn mat(&self, role: Role) -> Result<&DevMat> {
        self.mats
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, m)| m)
            .ok_or_else(|| Error::Internal(format!("the layer has no {role:?}")))
    }

    /// The layer's matrices, multiplied where they are held; a sparse layer's experts come
    /// from `experts`, staged through `stager` when there is a device.
    pub fn held<'a>(
        &'a self,
        experts: Option<ExpertAccess<'a>>,
        stager: Option<&'a mut Stager>,
    ) -> HeldMats<'a> {
        HeldMats {
            layer: self,
            experts,
            stager,
        }
    }

    /// Its matrices staged to the device through `stager` (the host tier of a device run).
    pub fn staged<'a>(
        &'a self,
        stager: &'a mut Stager,
        experts: Option<ExpertAccess<'a>>,
    ) -> StagedMats<'a> {
        StagedMats {
            layer: self,
            stager,
            experts,
        }
    }
}

/// The matrices of a held layer, multiplied where they are held.
pub struct HeldMats<'a> {
    layer: &'a HeldLayer,
    experts: Option<ExpertAccess<'a>>,
    /// Only for the experts, which stay in host memory.
    stager: Option<&'a mut Stager>,
}

impl HeldLayer {
    /// [`Matrices::rows`] of a held matrix: host memory only.
    fn rows(&self, role: Role, f: &mut dyn FnMut(usize, MatView) -> Result<()>) -> Result<()> {
        match self.mat(role)? {
            DevMat::Host(m) => f(0, m.view()),
            _ => Err(Error::Device(format!(
                "{role:?} is held on the GPU, and latent attention's absorbed products run on the CPU only in this version"
            ))),
        }
    }
}

impl Matrices for HeldMats<'_> {
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor> {
        self.layer.mat(role)?.matmul(x)
    }

    fn rows(&mut self, role: Role, f: &mut dyn FnMut(usize, MatView) -> Result<()>) -> Result<()> {
        self.layer.rows(role, f)
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

/// The matrices of a layer held in host memory, copied to the device for each product.
pub struct StagedMats<'a> {
    layer: &'a HeldLayer,
    stager: &'a mut Stager,
    experts: Option<ExpertAccess<'a>>,
}

impl Matrices for StagedMats<'_> {
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor> {
        match self.layer.mat(role)? {
            DevMat::Host(m) => self.stager.matmul_held(m.view(), x),
            other => other.matmul(x),
        }
    }

    fn rows(&mut self, role: Role, f: &mut dyn FnMut(usize, MatView) -> Result<()>) -> Result<()> {
        self.layer.rows(role, f)
    }

    fn experts(
        &mut self,
        experts: &[usize],
        input: &Tensor,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        let access = self.experts.as_mut().ok_or_else(no_experts)?;
        access.run(experts, input, Some(self.stager), f)
    }
}

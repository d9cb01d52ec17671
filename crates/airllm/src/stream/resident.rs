//! Residency: layers and the output head that the plan keeps in memory for the engine's life,
//! held in the file's form.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::block::{Matrices, Small};
use crate::model::matmul::mat_tensor;
use crate::weights::mat::Mat;
use crate::weights::schema::{LayerSchema, Role};
use crate::weights::WeightSource;

/// A decoder layer held whole.
pub struct HeldLayer {
    pub small: Small,
    mats: Vec<(Role, Mat)>,
}

impl HeldLayer {
    pub fn load(
        schema: &LayerSchema,
        src: &dyn WeightSource,
        layer: usize,
        norm_offset: f32,
        device: &Device,
    ) -> Result<Self> {
        let naming = src.naming();
        Ok(HeldLayer {
            small: Small::load(schema, src, layer, norm_offset, device)?,
            mats: schema
                .matrices()
                .map(|t| Ok((t.role, src.load_mat(&t.name(naming, layer))?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.small.bytes() + self.mats.iter().map(|(_, m)| m.bytes()).sum::<u64>()
    }

    /// The layer's small tensors and its matrices, for the block.
    pub fn parts(&self) -> (&Small, HeldMats<'_>) {
        (&self.small, HeldMats(&self.mats))
    }
}

/// The matrices of a held layer.
pub struct HeldMats<'a>(&'a [(Role, Mat)]);

impl Matrices for HeldMats<'_> {
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor> {
        let (_, m) = self.0.iter().find(|(r, _)| *r == role).ok_or_else(|| {
            crate::error::Error::Invalid(format!("internal error: the layer has no {role:?}"))
        })?;
        mat_tensor(x, m.view())
    }
}

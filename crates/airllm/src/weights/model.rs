//! A checkpoint opened for running: its config, its tensor table checked against the layer
//! schema (every tensor present, with the shape the config implies), and the sizes the plan is
//! made from. Opening also adapts GGUF files (their vocabulary arrays are dropped, LongRoPE's
//! factor tensors read into the config).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::io::read_capacity;
use crate::weights::schema::{Kind, LayerSchema, Naming, Role};
use crate::weights::{GgufSource, SafetensorsSource, WeightSource};

/// Sizes of a model's parts, from the checkpoint's tensor table and the layer schema.
#[derive(Debug, Clone)]
pub struct ModelSizes {
    pub params: u64,
    pub file_bytes: u64,
    pub layer_file_bytes: u64,
    /// Each layer's bytes on disk, its routed experts left out.
    pub layer_files: Vec<u64>,
    /// The largest layer's bytes as held (the file's form, or f16 for `--f16`).
    pub layer_bytes: u64,
    /// One layer's norms and biases (f32).
    pub small_bytes: u64,
    /// Bytes a read buffer needs per row of the widest streamed matrix (head included).
    pub max_row_bytes: u64,
    pub head_file_bytes: u64,
    pub head_bytes: u64,
    pub dtypes: Vec<&'static str>,
    /// The largest expert as held in a cache slot (its read buffers), and on disk.
    pub expert_bytes: u64,
    pub expert_file_bytes: u64,
    /// Experts over all sparse layers.
    pub experts_total: usize,
    /// The sparse layers' routers and their biases as held, over all layers: what expert
    /// look-ahead keeps a copy of.
    pub router_bytes: u64,
}

impl ModelSizes {
    pub fn of(cfg: &ModelConfig, src: &dyn WeightSource, head_name: &str) -> Result<Self> {
        let mut s = ModelSizes {
            params: 0,
            file_bytes: 0,
            layer_file_bytes: 0,
            layer_files: vec![],
            layer_bytes: 0,
            small_bytes: 0,
            max_row_bytes: 0,
            head_file_bytes: 0,
            head_bytes: 0,
            dtypes: vec![],
            expert_bytes: 0,
            expert_file_bytes: 0,
            experts_total: 0,
            router_bytes: 0,
        };
        let add = |name: &str, s: &mut ModelSizes| -> Result<crate::weights::TensorMeta> {
            let m = src
                .meta(name)
                .ok_or_else(|| Error::tensor(src.path(), name, "missing from the checkpoint"))?;
            s.params += m.numel() as u64;
            s.file_bytes += m.file_bytes;
            if !s.dtypes.contains(&m.dtype) {
                s.dtypes.push(m.dtype);
            }
            Ok(m)
        };
        let naming = src.naming();
        // The largest buffer each expert matrix (gate, up, down) needs over the layers.
        let mut role_bytes: Vec<u64> = vec![];
        for layer in 0..cfg.num_layers {
            let schema = LayerSchema::new(cfg, layer);
            let (mut held, mut file, mut small) = (0, 0, 0);
            for t in schema.tensors.iter().filter(|t| t.kind != Kind::Expert) {
                let m = add(&t.name(naming, layer), &mut s)?;
                file += m.file_bytes;
                if matches!(
                    t.role,
                    Role::Router | Role::RouterBias | Role::RouterLogitBias
                ) {
                    s.router_bytes += if t.is_small() {
                        m.numel() as u64 * 4
                    } else {
                        m.buffer_bytes()
                    };
                }
                if t.is_small() {
                    // Norms and biases are held in f32 whatever their shape (GPT-OSS's expert
                    // biases are 2-D).
                    let f32_bytes = m.numel() as u64 * 4;
                    small += f32_bytes;
                    held += f32_bytes;
                } else {
                    held += m.buffer_bytes();
                    s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
                }
            }
            // Quantized files may mix types across layers; plan for the largest layer.
            s.layer_bytes = s.layer_bytes.max(held);
            s.layer_file_bytes = s.layer_file_bytes.max(file);
            s.layer_files.push(file);
            s.small_bytes = s.small_bytes.max(small);
            // Experts: each is read whole into a cache slot, one buffer per matrix; a slot's
            // buffer for a role serves every layer, so it grows to that role's largest.
            let (mut file, mut n) = (0, 0);
            for (i, t) in schema.experts().enumerate() {
                n = t.experts;
                // transformers has a tensor per expert; GGUF one stack of them all.
                let (names, stacked): (Vec<String>, u64) = match naming {
                    _ if naming == Naming::Gguf || t.hf_stacked() => {
                        (vec![t.name(naming, layer)], t.experts as u64)
                    }
                    _ => (
                        (0..t.experts)
                            .map(|e| t.expert_name(naming, layer, e).0)
                            .collect(),
                        1,
                    ),
                };
                let mut per_file = 0u64;
                for name in &names {
                    let m = add(name, &mut s)?;
                    let bytes = m.buffer_row_bytes() * t.shape[0] as u64;
                    if role_bytes.len() <= i {
                        role_bytes.resize(i + 1, 0);
                    }
                    role_bytes[i] = role_bytes[i].max(read_capacity(bytes as usize) as u64);
                    per_file = per_file.max(m.file_bytes / stacked.max(1));
                    // Staged to a device, an expert goes through the slots in row tiles.
                    s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
                }
                file += per_file;
            }
            s.expert_bytes = role_bytes.iter().sum();
            s.expert_file_bytes = s.expert_file_bytes.max(file);
            s.experts_total += n;
        }
        add(naming.embed(), &mut s)?;
        add(naming.final_norm(), &mut s)?;
        if head_name != naming.embed() {
            add(head_name, &mut s)?;
        }
        if let Some(m) = src.meta(head_name) {
            s.head_file_bytes = m.file_bytes;
            s.head_bytes = m.buffer_bytes();
            s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
        }
        Ok(s)
    }
}

/// Opens the config, checkpoint and sizes of a model, shared by the engine and `inspect`.
pub struct ModelInfo {
    /// The model folder or GGUF file.
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub src: Arc<dyn WeightSource>,
    pub head_name: String,
    pub sizes: ModelSizes,
}

impl ModelInfo {
    /// Opens a Hugging Face folder or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Like [`ModelInfo::open`]; `dequantize` widens a GGUF file's quantized matrices to f32
    /// at load (see [`GgufSource::dequantize`]).
    pub fn open_with(path: &Path, dequantize: bool) -> Result<Self> {
        Self::open_opts(path, dequantize, false)
    }

    /// Like [`ModelInfo::open_with`]; `f16` holds a Hugging Face checkpoint's matrices as f16
    /// (see [`SafetensorsSource::f16`]). GGUF files keep their own types.
    pub fn open_opts(path: &Path, dequantize: bool, f16: bool) -> Result<Self> {
        let (cfg, src): (ModelConfig, Arc<dyn WeightSource>) = if crate::weights::is_gguf(path) {
            let mut g = GgufSource::open(path)?;
            g.dequantize = dequantize;
            // The vocabulary arrays are only for the tokenizer, which reads them separately;
            // the engine would otherwise hold them (~30 MB for a 262k vocabulary) for its life.
            let vocab = g
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|t| t.len() as u64);
            g.file
                .metadata
                .retain(|k, v| !(k.starts_with("tokenizer.ggml.") && v.as_array().is_some()));
            if let Some(n) = vocab {
                g.file.metadata.insert(
                    "tokenizer.ggml.tokens.count".into(),
                    crate::weights::gguf::Value::U(n),
                );
            }
            let mut cfg = ModelConfig::from_gguf(&g.file)?;
            // LongRoPE's factor sets are tensors in GGUF.
            if let RopeScaling::LongRope {
                short_factor,
                long_factor,
                ..
            } = &mut cfg.rope.scaling
            {
                let load = |n: &str| -> Result<Vec<f32>> {
                    Ok(g.load(n, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
                };
                *long_factor = load(Naming::GGUF_ROPE_FACTORS_LONG)?;
                *short_factor = load(Naming::GGUF_ROPE_FACTORS_SHORT)?;
            }
            (cfg, Arc::new(g))
        } else {
            let cfg = ModelConfig::from_file(&path.join("config.json"))?;
            let mut st = SafetensorsSource::open(path)?;
            st.f16 = f16;
            st.keep_f32 = (0..cfg.num_layers)
                .filter_map(|l| {
                    LayerSchema::new(&cfg, l)
                        .get(Role::Router)
                        .map(|t| t.name(Naming::Hf, l))
                })
                .collect();
            (cfg, Arc::new(st))
        };
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &cfg.rope.scaling
        {
            let half = cfg.rotary_dim / 2;
            if short_factor.len() != half || long_factor.len() != half {
                let (file, field) = if crate::weights::is_gguf(path) {
                    (path.to_path_buf(), "rope_factors_short/long.weight")
                } else {
                    (
                        path.join("config.json"),
                        "rope_scaling.short_factor/long_factor",
                    )
                };
                return Err(Error::config(
                    &file,
                    field,
                    format!(
                        "{} short and {} long factors; the {half} rotated pairs need {half} each",
                        short_factor.len(),
                        long_factor.len()
                    ),
                ));
            }
        }
        validate_layers(&cfg, src.as_ref())?;
        let naming = src.naming();
        let check = |name: &str, shape: &[usize]| -> Result<()> {
            let m = src
                .meta(name)
                .ok_or_else(|| Error::tensor(path, name, "missing from the checkpoint"))?;
            if m.shape != shape {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "shape {:?} disagrees with the config, which implies {shape:?}",
                        m.shape
                    ),
                ));
            }
            Ok(())
        };
        check(naming.embed(), &[cfg.vocab_size, cfg.hidden_size])?;
        check(naming.final_norm(), &[cfg.hidden_size])?;
        let head_name = if cfg.tie_word_embeddings {
            naming.embed().to_string()
        } else {
            check(naming.head(), &[cfg.vocab_size, cfg.hidden_size])?;
            naming.head().to_string()
        };
        let sizes = ModelSizes::of(&cfg, src.as_ref(), &head_name)?;
        Ok(ModelInfo {
            dir: path.to_path_buf(),
            cfg,
            src,
            head_name,
            sizes,
        })
    }
}

/// Checks that every tensor of every layer is present with the shape the config implies, so a
/// bad checkpoint fails at open rather than midway through a generation. Experts are checked
/// one by one in transformers' layout and as stacks in GGUF's, and a checkpoint with more
/// experts than the config names is refused too.
pub fn validate_layers(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<()> {
    let naming = src.naming();
    // Vectors may be stored with extra dimensions of 1 (llama.cpp's converter keeps
    // Qwen2-MoE's `[1, hidden]` gate 2-D; ours writes it 1-D); they are read whole either way.
    let squeeze = |s: &[usize]| -> Vec<usize> { s.iter().copied().filter(|&d| d != 1).collect() };
    let check = |name: &str, want: &[usize], small: bool, what: &str| -> Result<()> {
        let meta = src
            .meta(name)
            .ok_or_else(|| Error::tensor(src.path(), name, "missing from the checkpoint"))?;
        let same = if small {
            squeeze(&meta.shape) == squeeze(want)
        } else {
            meta.shape == want
        };
        if !same {
            return Err(Error::tensor(
                src.path(),
                name,
                format!(
                    "shape {:?} disagrees with the config, which implies {want:?}{what}",
                    meta.shape
                ),
            ));
        }
        Ok(())
    };
    for layer in 0..cfg.num_layers {
        let schema = LayerSchema::new(cfg, layer);
        for t in &schema.tensors {
            let want = t.stored_shape(naming);
            let experts = cfg.moe.as_ref().map_or(0, |m| m.experts);
            let counted = format!(" ({experts} experts)");
            if t.kind != Kind::Expert {
                let what = if t.role == Role::Router { &counted } else { "" };
                check(&t.name(naming, layer), &want, t.is_small(), what)?;
                continue;
            }
            if naming == Naming::Gguf || t.hf_stacked() {
                check(&t.name(naming, layer), &want, false, &counted)?;
                continue;
            }
            for e in 0..t.experts {
                check(&t.expert_name(naming, layer, e).0, &want, false, "")?;
            }
            let extra = t.expert_name(naming, layer, t.experts).0;
            if src.meta(&extra).is_some() {
                return Err(Error::tensor(
                    src.path(),
                    &extra,
                    format!("is one expert more than the {} the config names", t.experts),
                ));
            }
        }
    }
    Ok(())
}

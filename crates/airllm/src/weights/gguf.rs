//! A GGUF reader that validates as it parses. Every length and offset read from the file is
//! checked against the file's size before anything is allocated, so a corrupt or truncated file
//! gives a one-line error instead of a huge allocation or a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::mat::Form;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U(u64),
    I(i64),
    F(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(v) => Some(*v),
            Value::U(v) => Some(*v as f64),
            Value::I(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::U(v) => Some(*v != 0),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Shape in row-major order (GGUF stores it innermost first; this is reversed).
    pub shape: Vec<usize>,
    /// The stored type, as the form it is held in.
    pub form: Form,
    /// Absolute offset in the file.
    pub offset: u64,
    pub nbytes: u64,
}

impl GgufTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of one row (the innermost dimension).
    pub fn row_bytes(&self) -> usize {
        self.form.row_bytes(*self.shape.last().unwrap_or(&1))
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, GgufTensor>,
    /// Tensor names in file order.
    pub order: Vec<String>,
    pub io: super::io::Io,
    /// The same file opened for O_DIRECT, for tensor reads, where the filesystem allows it.
    pub direct: Option<File>,
}

/// What a config is read from: a GGUF file's metadata and tensor shapes. The converter checks
/// its output header through the same reader before writing any data.
pub trait GgufMeta {
    fn path(&self) -> &Path;
    fn get(&self, key: &str) -> Option<&Value>;
    fn tensor_shape(&self, name: &str) -> Option<&[usize]>;
}

impl GgufMeta for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }
}

struct Cursor<'a> {
    r: BufReader<&'a File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Cursor<'_> {
    fn err(&self, msg: String) -> Error {
        Error::file(self.path, msg)
    }
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.err(format!(
                "{what} of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("read failed at byte {}: {e}", self.pos)))?;
        self.pos += n;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, &format!("{what} (string length {n})"))?;
        String::from_utf8(b).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U(self.bytes(1, key)?[0] as u64),
            1 => Value::I(self.bytes(1, key)?[0] as i8 as i64),
            2 => Value::U(u16::from_le_bytes(self.bytes(2, key)?.try_into().unwrap()) as u64),
            3 => Value::I(i16::from_le_bytes(self.bytes(2, key)?.try_into().unwrap()) as i64),
            4 => Value::U(self.u32(key)? as u64),
            5 => Value::I(self.u32(key)? as i32 as i64),
            6 => Value::F(f32::from_le_bytes(self.bytes(4, key)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.bytes(1, key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("metadata `{key}`: arrays nested too deep")));
                }
                let ity = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte, so a count beyond the bytes left is a lie.
                let min = match ity {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => {
                        return Err(self.err(format!(
                            "metadata `{key}`: unknown array element type {ity}"
                        )))
                    }
                };
                if n.saturating_mul(min) > self.len.saturating_sub(self.pos) {
                    return Err(self.err(format!(
                        "metadata `{key}`: array of {n} elements at byte {} is larger than the file ({} bytes)",
                        self.pos, self.len
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ity, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U(self.u64(key)?),
            11 => Value::I(self.u64(key)? as i64),
            12 => Value::F(f64::from_le_bytes(self.bytes(8, key)?.try_into().unwrap())),
            other => return Err(self.err(format!("metadata `{key}`: unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| Error::file(path, format!("cannot stat: {e}")))?
            .len();
        let mut c = Cursor {
            r: BufReader::with_capacity(1 << 20, &file),
            pos: 0,
            len,
            path,
        };
        let magic = c
            .bytes(4, "magic")
            .map_err(|_| Error::file(path, format!("not a GGUF file: only {len} bytes")))?;
        if magic != b"GGUF" {
            return Err(Error::file(
                path,
                format!("not a GGUF file: magic {magic:02x?} is not \"GGUF\""),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::file(
                path,
                format!("unsupported GGUF version {version} (supported: 2, 3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A tensor entry or key/value pair takes at least 8 bytes.
        if n_tensors.saturating_add(n_kv).saturating_mul(8) > len {
            return Err(Error::file(
                path,
                format!("header claims {n_tensors} tensors and {n_kv} metadata entries, more than a {len}-byte file can hold"),
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)?;
            if nd == 0 || nd > 4 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{nd} dimensions (expected 1 to 4)"),
                ));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&name)?);
            }
            let ty = c.u32(&name)?;
            let off = c.u64(&name)?;
            infos.push((name, dims, ty, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::config(
                path,
                "general.alignment",
                format!("{align} is not a power of two"),
            ));
        }
        let data_start = c.pos.next_multiple_of(align);
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for (name, dims, ty, off) in infos {
            let form = Form::of_gguf_id(ty).ok_or_else(|| {
                Error::tensor(
                    path,
                    &name,
                    format!("unknown or unsupported quantization type {ty}"),
                )
            })?;
            let tname = form.name();
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let bs = form.block_size() as u64;
            let inner = dims[0];
            if inner % bs != 0 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!(
                        "row of {inner} elements is not a multiple of the {tname} block of {bs}"
                    ),
                ));
            }
            let nbytes = numel
                .and_then(|n| (n / bs).checked_mul(form.row_bytes(bs as usize) as u64))
                .ok_or_else(|| {
                    Error::tensor(path, &name, format!("shape {dims:?} is too large"))
                })?;
            let start = data_start.checked_add(off);
            match start.and_then(|s| s.checked_add(nbytes)) {
                Some(end) if end <= len => {}
                _ => {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "data at offset {off} ({nbytes} bytes of {tname}) runs past the end of the file ({len} bytes)"
                        ),
                    ))
                }
            }
            order.push(name.clone());
            tensors.insert(
                name,
                GgufTensor {
                    shape: dims.iter().rev().map(|&d| d as usize).collect(),
                    form,
                    offset: data_start + off,
                    nbytes,
                },
            );
        }
        drop(c);
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            len,
            version,
            metadata,
            tensors,
            order,
            io: super::io::Io::default(),
            direct: super::io::open_direct(path),
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Reads `len` bytes of tensor data at `at` (absolute).
    pub fn read(&self, name: &str, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.io
            .read_at(&self.file, &mut b, at)
            .map_err(|e| Error::tensor(&self.path, name, format!("read failed: {e}")))?;
        Ok(b)
    }

    /// The architecture named in `general.architecture`.
    pub fn arch(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::config(
                    &self.path,
                    "general.architecture",
                    "required metadata is missing",
                )
            })
    }
}

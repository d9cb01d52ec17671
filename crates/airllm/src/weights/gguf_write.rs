//! A streaming GGUF writer. The header (metadata and every tensor's name, shape, type and
//! offset) is fixed before any data is written, so tensors can be produced one at a time and the
//! writer never holds more than the caller hands it.
//!
//! The file is created unnamed (`O_TMPFILE`) in the destination folder and linked into place only
//! once complete: a crash, a kill or a full disk leaves nothing behind that could pass for a model.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::gguf::{GgufMeta, Value};
use super::mat::Form;
use crate::error::{Error, Result};

/// Data offsets are aligned to this (GGUF's default `general.alignment`).
pub const ALIGN: u64 = 32;

/// One tensor of the output, in file order.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    /// Row-major shape, outermost first (the reverse of GGUF's `ne`).
    pub shape: Vec<usize>,
    /// The stored type (a GGUF type: FP8 has none).
    pub form: Form,
}

impl TensorPlan {
    pub fn bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n / self.form.block_size() * self.form.row_bytes(self.form.block_size())) as u64
    }
}

/// Everything in a GGUF header.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    /// Where the file will go, for messages.
    pub path: PathBuf,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorPlan>,
    index: HashMap<String, usize>,
    meta_index: HashMap<String, usize>,
}

impl GgufPlan {
    pub fn new(path: &Path) -> Self {
        GgufPlan {
            path: path.to_path_buf(),
            metadata: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
            meta_index: HashMap::new(),
        }
    }

    pub fn set(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        match self.meta_index.get(&key) {
            Some(&i) => self.metadata[i].1 = v,
            None => {
                self.meta_index.insert(key.clone(), self.metadata.len());
                self.metadata.push((key, v));
            }
        }
    }

    pub fn add_tensor(&mut self, t: TensorPlan) -> Result<()> {
        let cols = *t.shape.last().unwrap_or(&1);
        if !cols.is_multiple_of(t.form.block_size()) || t.form.gguf_id().is_none() {
            return Err(Error::tensor(
                &self.path,
                &t.name,
                format!(
                    "rows of {cols} values cannot be stored as {} (blocks of {})",
                    t.form.name(),
                    t.form.block_size()
                ),
            ));
        }
        self.index.insert(t.name.clone(), self.tensors.len());
        self.tensors.push(t);
        Ok(())
    }

    /// The header bytes, padded so that data starts aligned.
    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut h, k);
            put_value(&mut h, v, true);
        }
        let mut off = 0u64;
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                h.extend_from_slice(&(d as u64).to_le_bytes());
            }
            // Checked by `add_tensor`.
            h.extend_from_slice(&t.form.gguf_id().unwrap_or(0).to_le_bytes());
            h.extend_from_slice(&off.to_le_bytes());
            off = align(off + t.bytes());
        }
        h.resize(align(h.len() as u64) as usize, 0);
        h
    }

    /// The size of the finished file.
    pub fn file_bytes(&self) -> u64 {
        self.header().len() as u64 + self.tensors.iter().map(|t| align(t.bytes())).sum::<u64>()
    }
}

impl GgufMeta for GgufPlan {
    fn path(&self) -> &Path {
        &self.path
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.index
            .get(name)
            .map(|&i| self.tensors[i].shape.as_slice())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// GGUF value type ids.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U(_) => 4, // u32 (llama.cpp reads counts and ids as u32)
        Value::I(_) => 5, // i32
        Value::F(_) => 6, // f32
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
    }
}

fn put_value(h: &mut Vec<u8>, v: &Value, tagged: bool) {
    if tagged {
        h.extend_from_slice(&type_id(v).to_le_bytes());
    }
    match v {
        Value::U(x) => h.extend_from_slice(&(*x as u32).to_le_bytes()),
        Value::I(x) => h.extend_from_slice(&(*x as i32).to_le_bytes()),
        Value::F(x) => h.extend_from_slice(&(*x as f32).to_le_bytes()),
        Value::Bool(b) => h.push(*b as u8),
        Value::Str(s) => put_str(h, s),
        Value::Array(items) => {
            let elem = items.first().map_or(8, type_id);
            h.extend_from_slice(&elem.to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(h, it, false);
            }
        }
    }
}

/// An output file under construction. Dropping it without [`OutFile::commit`] leaves nothing.
pub struct OutFile {
    path: PathBuf,
    w: BufWriter<File>,
    /// Where an unnamed file could not be made, the named temporary to remove on failure.
    named_tmp: Option<PathBuf>,
    written: u64,
    total: u64,
}

impl OutFile {
    /// Creates the file for `total` bytes at `path`, checking the folder and its free space.
    pub fn create(path: &Path, total: u64) -> Result<Self> {
        let dir = crate::util::output_parent(path)?;
        if path.is_dir() {
            return Err(Error::file(
                path,
                "is a folder; give a file name ending in .gguf",
            ));
        }
        if let Some(free) = free_bytes(dir) {
            if free < total {
                return Err(Error::file(
                    path,
                    format!(
                        "not enough disk space: the output needs {} ({total} bytes), {} free",
                        crate::util::fmt_bytes(total),
                        crate::util::fmt_bytes(free)
                    ),
                ));
            }
        }
        let (file, named_tmp) = match unnamed_file(dir) {
            Some(f) => (f, None),
            None => {
                let tmp = dir.join(format!(
                    ".{}.partial",
                    path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
                ));
                let f = File::create(&tmp)
                    .map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
                (f, Some(tmp))
            }
        };
        Ok(OutFile {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(8 << 20, file),
            named_tmp,
            written: 0,
            total,
        })
    }

    pub fn write(&mut self, b: &[u8]) -> Result<()> {
        let r = self.w.write_all(b);
        self.check(r)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Pads with zeros to the data alignment.
    pub fn pad(&mut self) -> Result<()> {
        let n = (align(self.written) - self.written) as usize;
        self.write(&[0u8; ALIGN as usize][..n])
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn check(&self, r: std::io::Result<()>) -> Result<()> {
        r.map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => format!(
                    " (the output needs {} = {} bytes)",
                    crate::util::fmt_bytes(self.total),
                    self.total
                ),
                _ => String::new(),
            };
            Error::file(&self.path, format!("write failed: {e}{hint}"))
        })
    }

    /// Flushes, syncs and gives the file its name, replacing any file already there.
    pub fn commit(mut self) -> Result<()> {
        let r = self.w.flush();
        self.check(r)?;
        let r = self.w.get_ref().sync_all();
        self.check(r)?;
        if self.written != self.total {
            return Err(Error::file(
                &self.path,
                format!(
                    "internal error: wrote {} bytes, planned {}",
                    self.written, self.total
                ),
            ));
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = match self.named_tmp.take() {
            Some(t) => t,
            None => {
                // Link the unnamed file under a hidden name, then rename it over the target
                // (linkat cannot replace an existing file).
                use std::os::fd::AsRawFd;
                let tmp = dir.join(format!(
                    ".{}.{}.tmp",
                    self.path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("out"),
                    std::process::id()
                ));
                let _ = std::fs::remove_file(&tmp);
                let src = std::ffi::CString::new(format!(
                    "/proc/self/fd/{}",
                    self.w.get_ref().as_raw_fd()
                ))
                .unwrap();
                let dst = cstr(&tmp)?;
                let rc = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        src.as_ptr(),
                        libc::AT_FDCWD,
                        dst.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(Error::file(
                        &self.path,
                        format!("cannot name the output: {e}"),
                    ));
                }
                tmp
            }
        };
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::file(&self.path, format!("cannot rename into place: {e}"))
        })
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if let Some(t) = &self.named_tmp {
            let _ = std::fs::remove_file(t);
        }
    }
}

fn cstr(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::file(p, "path contains a NUL byte"))
}

/// An unnamed file in `dir`, which the kernel frees if we die before linking it.
fn unnamed_file(dir: &Path) -> Option<File> {
    use std::os::fd::FromRawFd;
    let c = cstr(dir).ok()?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        )
    };
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let c = cstr(dir).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::GgufFile;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut plan = GgufPlan::new(&path);
        plan.set("general.architecture", Value::Str("llama".into()));
        plan.set("x.count", Value::U(7));
        plan.set("x.eps", Value::F(1e-5));
        plan.set(
            "x.list",
            Value::Array(vec![Value::Str("a".into()), Value::Str("bc".into())]),
        );
        plan.add_tensor(TensorPlan {
            name: "a".into(),
            shape: vec![3],
            form: Form::F32,
        })
        .unwrap();
        plan.add_tensor(TensorPlan {
            name: "b".into(),
            shape: vec![2, 32],
            form: Form::Q(candle_core::quantized::GgmlDType::Q8_0),
        })
        .unwrap();
        let mut out = OutFile::create(&path, plan.file_bytes()).unwrap();
        out.write(&plan.header()).unwrap();
        out.write(&[0u8; 12]).unwrap();
        out.pad().unwrap();
        out.write(&[0u8; 68]).unwrap();
        out.pad().unwrap();
        // Nothing is visible before the commit.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        out.commit().unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get("x.count"), Some(&Value::U(7)));
        assert_eq!(g.tensors["b"].shape, vec![2, 32]);
        assert_eq!(g.tensors["b"].nbytes, 68);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut out = OutFile::create(&path, 100).unwrap();
        out.write(b"GGUF").unwrap();
        drop(out);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

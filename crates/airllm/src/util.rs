//! Small helpers shared by the engine and the CLI: byte sizes and the machine's free memory.

use crate::error::{Error, Result};

/// Parses sizes such as `512MiB`, `6GiB`, `1.5G`, `800M` or a plain byte count.
/// Decimal suffixes (`GB`, `MB`) are powers of 1000, binary ones (`GiB`, `G`) powers of 1024,
/// matching what users of llama.cpp and ollama write.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::Invalid(format!("size `{s}`: expected a number such as 512MiB")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        other => {
            return Err(Error::Invalid(format!(
                "size `{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, TiB or KB, MB, GB)"
            )))
        }
    };
    Ok((value * mult).round() as u64)
}

pub use crate::units::fmt_bytes;

/// FNV-1a, 64-bit: a fast, stable hash for names and paths (not for security).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The folder an output path goes into, which must exist.
pub fn output_parent(out: &std::path::Path) -> Result<&std::path::Path> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(Error::file(parent, "output folder does not exist"));
    }
    Ok(parent)
}

/// Creates the folder `out` by filling a hidden temporary folder beside it with `fill` and
/// renaming it into place, so a failure or a kill never leaves a folder that looks complete.
pub fn write_folder(
    out: &std::path::Path,
    fill: impl FnOnce(&std::path::Path) -> Result<()>,
) -> Result<()> {
    if out.exists() {
        return Err(Error::file(
            out,
            "already exists; remove it or choose another output",
        ));
    }
    let parent = output_parent(out)?;
    let tmp = parent.join(format!(
        ".{}.partial",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out)
        .map_err(|e| Error::file(out, format!("cannot rename into place: {e}")))
}

/// `MemAvailable` from /proc/meminfo, the kernel's estimate of what can be allocated without
/// swapping. `None` where it cannot be read (non-Linux).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident set size of this process now (VmRSS), in bytes.
pub fn rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("6GiB").unwrap(), 6 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("800MB").unwrap(), 800_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }
}

//! Small filesystem helpers every part of the store uses.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: a temp file beside it, fsync,
/// rename, fsync of the directory. Readers see the old file or the new one,
/// never a half-written one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    sync_dir(dir)
}

/// fsync a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A unique name for temporary work: pid, time and a process-wide counter.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn tempfile_in(dir: &Path) -> std::io::Result<(std::path::PathBuf, File)> {
    let path = dir.join(unique_name(".tmp-"));
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, file))
}

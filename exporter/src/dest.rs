//! Output destinations written beside, then renamed into place: an error
//! (or a crash) never leaves a partial file at `dest`. A file dest of `-`
//! is standard output, as in buildx (`-o type=tar,dest=-`).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_cache::fsutil::{sync_dir, unique_name};

/// A file or directory being written next to its destination. Dropped
/// without [`StagedDest::commit`], it is removed.
pub struct StagedDest {
    dest: PathBuf,
    tmp: PathBuf,
    committed: bool,
    /// Writing to standard output: nothing to rename or remove.
    stdout: bool,
}

/// The dest that means standard output.
pub const STDOUT_DEST: &str = "-";

fn check_dest(dest: &Path, dir_ok: bool) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(!dest.as_os_str().is_empty(), "dest is empty");
    let name = dest.file_name().with_context(|| format!("dest {} has no file name", dest.display()))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    anyhow::ensure!(parent.is_dir(), "cannot write {}: directory {} does not exist", dest.display(), parent.display());
    if let Ok(meta) = dest.symlink_metadata() {
        let empty_dir = dir_ok && meta.is_dir() && std::fs::read_dir(dest).map(|mut d| d.next().is_none()).unwrap_or(false);
        anyhow::ensure!(empty_dir, "cannot write {}: it already exists (remove it first)", dest.display());
    }
    Ok(parent.join(unique_name(&format!(".{}.kiln-", name.to_string_lossy()))))
}

impl StagedDest {
    /// Stage a file for `dest`, which must not exist.
    pub fn file(dest: &Path) -> anyhow::Result<(StagedDest, BufWriter<File>)> {
        if dest == Path::new(STDOUT_DEST) {
            return Self::stdout();
        }
        let tmp = check_dest(dest, false)?;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok((StagedDest { dest: dest.to_path_buf(), tmp, committed: false, stdout: false }, BufWriter::with_capacity(1 << 20, file)))
    }

    /// Standard output as the file (a duplicate of fd 1). A terminal is
    /// refused: a tarball on it helps no one, as `docker save` says too.
    fn stdout() -> anyhow::Result<(StagedDest, BufWriter<File>)> {
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        let out = std::io::stdout();
        anyhow::ensure!(!out.is_terminal(), "refusing to write the output to a terminal (dest=-): redirect standard output");
        let fd = out.as_fd().try_clone_to_owned().context("duplicating standard output")?;
        let staged = StagedDest { dest: PathBuf::from(STDOUT_DEST), tmp: PathBuf::new(), committed: false, stdout: true };
        Ok((staged, BufWriter::with_capacity(1 << 20, File::from(fd))))
    }

    /// Stage a directory for `dest`, which must not exist or be empty.
    pub fn dir(dest: &Path) -> anyhow::Result<StagedDest> {
        anyhow::ensure!(dest != Path::new(STDOUT_DEST), "dest=- (standard output) needs a file output (type=tar, oci or docker), not a directory");
        let tmp = check_dest(dest, true)?;
        std::fs::create_dir(&tmp).with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(StagedDest { dest: dest.to_path_buf(), tmp, committed: false, stdout: false })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Move the staged file or directory to its destination.
    pub fn commit(mut self, file: Option<BufWriter<File>>) -> anyhow::Result<()> {
        if self.stdout {
            if let Some(file) = file {
                file.into_inner().map_err(|e| e.into_error()).context("writing to standard output")?;
            }
            self.committed = true;
            return Ok(());
        }
        if let Some(file) = file {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        // An empty directory at dest (checked when staged) is replaced by
        // the rename; one that filled up meanwhile makes it fail.
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("moving the output to {}", self.dest.display()))?;
        self.committed = true;
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for StagedDest {
    fn drop(&mut self) {
        if !self.committed && !self.stdout {
            let _ = std::fs::remove_dir_all(&self.tmp).or_else(|_| std::fs::remove_file(&self.tmp));
        }
    }
}

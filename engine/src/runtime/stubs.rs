//! Mount points the runtime has to create inside the rootfs, and their
//! removal afterwards.
//!
//! A mount target that does not exist in the image (e.g. `/proc`, or
//! `/etc/hosts`) must be created before anything can be mounted on it, and
//! creating it through the overlay writes it into the upperdir — which is
//! the new layer. [`Stubs`] records exactly what it created (and which
//! existing parent directories that creation copied up), and
//! [`Stubs::remove_from_upper`] takes them out of the upperdir again once
//! the overlay is unmounted: only entries that are still what kiln made
//! (empty file, empty directory, copied-up directory with the original
//! owner and mode), looked up with `openat2(RESOLVE_NO_SYMLINKS)` so a
//! symlink the process planted is never followed (cf. CVE-2024-23652).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::fsat::{self, Resolve};

/// Whether a mount target is a directory or a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StubKind {
    /// A directory mount point.
    Dir,
    /// A file mount point (e.g. `/etc/hosts`).
    File,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Made {
    /// Kiln created this entry (relative path).
    Created(PathBuf, StubKind),
    /// This directory existed only in a lower layer; creating something in
    /// it copied it up. Remember its owner and mode to recognise it.
    CopiedUp {
        rel: PathBuf,
        uid: u32,
        gid: u32,
        mode: u32,
    },
}

/// What kiln created in a rootfs, in creation order.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stubs {
    made: Vec<Made>,
}

impl Stubs {
    /// Make sure `target` (absolute container path) exists in the merged
    /// rootfs at `merged`, creating missing parents and the target itself.
    /// `upper` is the overlay's upperdir (to learn what creation copies up).
    /// A target whose last component is a symlink is left alone (the runtime
    /// resolves it inside the root); a symlink among its parents is an error.
    pub fn ensure(
        &mut self,
        merged: &Path,
        upper: &Path,
        target: &Path,
        kind: StubKind,
    ) -> anyhow::Result<()> {
        let parts = fsat::components(target)?;
        let Some((last, parents)) = parts.split_last() else {
            return Ok(());
        };
        let root = fsat::open_dir(merged)
            .with_context(|| format!("opening rootfs {}", merged.display()))?;
        let upper_fd = fsat::open_dir(upper)
            .with_context(|| format!("opening upperdir {}", upper.display()))?;
        let mut dir: OwnedFd = root.try_clone()?;
        let mut rel = PathBuf::new();
        let mut pending_copy_up = Vec::new();
        for name in parents {
            rel.push(name);
            match fsat::lstat_at(dir.as_fd(), name)? {
                None => {
                    fsat::mkdir_at(dir.as_fd(), name, 0o755).with_context(|| {
                        format!("creating mount point parent /{}", rel.display())
                    })?;
                    self.made.push(Made::Created(rel.clone(), StubKind::Dir));
                }
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    if !in_upper(&upper_fd, &rel) {
                        pending_copy_up.push(Made::CopiedUp {
                            rel: rel.clone(),
                            uid: st.st_uid,
                            gid: st.st_gid,
                            mode: st.st_mode & 0o7777,
                        });
                    }
                }
                Some(_) => bail!(
                    "mount target {}: /{} is a symlink or not a directory",
                    target.display(),
                    rel.display()
                ),
            }
            dir = fsat::open_beneath(
                dir.as_fd(),
                Path::new(name),
                libc::O_DIRECTORY | libc::O_RDONLY,
                Resolve::NoSymlinks,
            )
            .with_context(|| format!("opening /{} in the rootfs", rel.display()))?;
        }
        rel.push(last);
        if fsat::lstat_at(dir.as_fd(), last)?.is_some() {
            return Ok(());
        }
        // Creating the target copies up every existing parent not yet in the upperdir.
        self.made.extend(pending_copy_up);
        match kind {
            StubKind::Dir => fsat::mkdir_at(dir.as_fd(), last, 0o755),
            StubKind::File => fsat::create_file_at(dir.as_fd(), last, 0o644),
        }
        .with_context(|| format!("creating mount point /{}", rel.display()))?;
        self.made.push(Made::Created(rel, kind));
        Ok(())
    }

    /// Remove from the (unmounted) upperdir every stub that is still exactly
    /// what kiln created, newest first. Entries the process changed stay.
    pub fn remove_from_upper(&self, upper: &Path) -> anyhow::Result<()> {
        if self.made.is_empty() {
            return Ok(());
        }
        let upper_fd = fsat::open_dir(upper)
            .with_context(|| format!("opening upperdir {}", upper.display()))?;
        for made in self.made.iter().rev() {
            let (rel, check): (&Path, &dyn Fn(&libc::stat, &OwnedFd) -> bool) = match made {
                Made::Created(rel, StubKind::File) => (rel, &|st, _| {
                    st.st_mode & libc::S_IFMT == libc::S_IFREG
                        && st.st_size == 0
                        && st.st_nlink == 1
                }),
                Made::Created(rel, StubKind::Dir) => (rel, &|st, fd| {
                    st.st_mode & libc::S_IFMT == libc::S_IFDIR
                        && fsat::dir_is_empty(fd.as_fd()).unwrap_or(false)
                }),
                Made::CopiedUp {
                    rel,
                    uid,
                    gid,
                    mode,
                } => (rel, &move |st: &libc::stat, fd: &OwnedFd| {
                    st.st_mode & libc::S_IFMT == libc::S_IFDIR
                        && st.st_uid == *uid
                        && st.st_gid == *gid
                        && st.st_mode & 0o7777 == *mode
                        && !fsat::is_opaque(fd.as_fd())
                        && fsat::dir_is_empty(fd.as_fd()).unwrap_or(false)
                }),
            };
            let Some(name) = rel.file_name() else {
                continue;
            };
            let parent = rel.parent().unwrap_or(Path::new(""));
            // Any symlink on the way (planted by the process) makes this fail: leave it.
            let Ok(parent_fd) = fsat::open_beneath(
                upper_fd.as_fd(),
                parent,
                libc::O_DIRECTORY | libc::O_RDONLY,
                Resolve::NoSymlinks,
            ) else {
                continue;
            };
            let Ok(fd) = fsat::open_beneath(
                parent_fd.as_fd(),
                Path::new(name),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                Resolve::NoSymlinks,
            ) else {
                continue;
            };
            let Ok(st) = fsat::fstat(fd.as_fd()) else {
                continue;
            };
            if !check(&st, &fd) {
                continue;
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            drop(fd);
            remove_checked(&parent_fd, name, is_dir)
                .with_context(|| format!("removing stub /{}", rel.display()))?;
        }
        Ok(())
    }

    /// The record as one line of JSON (saved beside the container state).
    pub fn to_record(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Read back [`Stubs::to_record`].
    pub fn from_record(text: &str) -> Option<Stubs> {
        serde_json::from_str(text.trim()).ok()
    }
}

fn in_upper(upper: &OwnedFd, rel: &Path) -> bool {
    fsat::open_beneath(
        upper.as_fd(),
        rel,
        libc::O_PATH | libc::O_NOFOLLOW,
        Resolve::NoSymlinks,
    )
    .is_ok()
}

fn remove_checked(parent: &OwnedFd, name: &OsStr, is_dir: bool) -> anyhow::Result<()> {
    match fsat::unlink_at(parent.as_fd(), name, is_dir) {
        Ok(()) => Ok(()),
        // Raced with a change, or not empty after all: leave it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

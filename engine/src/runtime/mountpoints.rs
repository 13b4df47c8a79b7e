//! The layer of standard mount points.
//!
//! Every container needs `/proc`, `/dev`, `/sys`, `/etc/hosts` and
//! `/etc/resolv.conf` to exist as mount points. Most images lack some (few
//! ship `/etc/hosts`), and creating them in the upperdir, then taking them
//! out again before the diff is committed ([`super::stubs`]), costs a
//! copy-up of `/etc` and half a dozen inode creations and deletions per
//! build step: about 2 ms on an ext4 that has just deleted many inodes.
//! Docker's answer, used here too: a small read-only layer holding just
//! those mount points, laid above the image's layers. It is made once per
//! distinct `/etc` of the images (owner, mode and mtime are the image's, so
//! a copy-up of `/etc` during a RUN yields the very same diff) and kept in
//! the runtime's state directory. Its entries only ever sit under mounts,
//! so the image's own `/etc/hosts` or `/dev`, if any, are hidden exactly as
//! the mounts hide them anyway.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directories and files of the layer (relative, created in order).
const DIRS: [&str; 4] = ["proc", "dev", "sys", "etc"];
const FILES: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

/// What the image's layers (bottom first) have at `/etc`.
#[derive(Debug, PartialEq, Eq)]
enum Etc {
    /// No `/etc`: the layer's is root's, 0755.
    Missing,
    /// A directory with these attributes, which the layer's `/etc` copies.
    Dir {
        uid: u32,
        gid: u32,
        mode: u32,
        mtime: (i64, i64),
    },
}

/// The mount-point layer for a rootfs of `lower` (bottom first), under
/// `state_root`; `None` when `/etc` is something this layer cannot stand in
/// for (a symlink, a file, a directory with extended attributes): the
/// caller then creates mount-point stubs in the upperdir as before.
pub(crate) fn layer_for(state_root: &Path, lower: &[PathBuf]) -> anyhow::Result<Option<PathBuf>> {
    let Some(etc) = find_etc(lower)? else {
        return Ok(None);
    };
    let key = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(format!("v1 {etc:?}").as_bytes())[..8])
    };
    let base = state_root.join("mountpoints");
    let layer = base.join(&key);
    if std::fs::symlink_metadata(&layer).is_ok_and(|m| m.is_dir()) {
        return Ok(Some(layer));
    }
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    // Made aside and renamed into place: a layer is complete or absent.
    let tmp = base.join(kiln_cache::fsutil::unique_name(".tmp-"));
    let made = make_layer(&tmp, &etc).and_then(|()| Ok(std::fs::rename(&tmp, &layer)?));
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another container made the same layer first.
        if std::fs::symlink_metadata(&layer).is_ok_and(|m| m.is_dir()) {
            return Ok(Some(layer));
        }
    }
    made.with_context(|| format!("making the mount-point layer {}", layer.display()))?;
    Ok(Some(layer))
}

/// Remove half-made layers (a process died while making one) under
/// `state_root`; a minute old at least, so never one being made.
pub(crate) fn remove_stale_temporaries(state_root: &Path) {
    let Ok(entries) = std::fs::read_dir(state_root.join("mountpoints")) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_name().as_bytes().starts_with(b".tmp-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() >= 60));
        if stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The top-most `/etc` of `lower`, as overlayfs would show it; `None` if
/// it is anything but a plain directory or missing.
fn find_etc(lower: &[PathBuf]) -> anyhow::Result<Option<Etc>> {
    let view = kiln_cache::layered::LayeredView::new(lower.to_vec());
    let found = view.lookup(Path::new("etc")).context("looking up /etc in the image's layers")?;
    let Some(entry) = found else {
        return Ok(Some(Etc::Missing));
    };
    let m = &entry.metadata;
    if !m.is_dir() || has_xattrs(&entry.host_path)? {
        return Ok(None);
    }
    Ok(Some(Etc::Dir {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
        mtime: (m.mtime(), m.mtime_nsec()),
    }))
}

/// Build the layer's tree at `dir`.
fn make_layer(dir: &Path, etc: &Etc) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o755);
    builder.create(dir)?;
    for d in DIRS {
        builder.create(dir.join(d))?;
    }
    for f in FILES {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(dir.join(f))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    if let Etc::Dir { uid, gid, mode, mtime } = etc {
        let path = dir.join("etc");
        // chown first: it clears set-id bits that chmod then restores.
        std::os::unix::fs::lchown(&path, Some(*uid), Some(*gid))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
        let times = [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: mtime.0, tv_nsec: mtime.1 },
        ];
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: NUL-terminated path and a two-element timespec array.
        if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// Whether `path` (not followed) carries any extended attribute other
/// than overlayfs's own bookkeeping.
fn has_xattrs(path: &Path) -> anyhow::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path and a buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(false),
            // More than fits: certainly some of its own.
            Some(libc::ERANGE) => Ok(true),
            _ => Err(err).with_context(|| format!("listing xattrs of {}", path.display())),
        };
    }
    Ok(buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .any(|name| !name.starts_with(b"trusted.overlay.") && !name.starts_with(b"user.overlay.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let p = root.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn etc_of_the_top_most_layer_that_has_one() {
        let t = tempfile::tempdir().unwrap();
        let base = layer(t.path(), "base");
        std::fs::create_dir(base.join("etc")).unwrap();
        std::fs::set_permissions(base.join("etc"), std::fs::Permissions::from_mode(0o750)).unwrap();
        let empty = layer(t.path(), "empty");
        let lower = vec![base.clone(), empty.clone()];
        match find_etc(&lower).unwrap() {
            Some(Etc::Dir { mode, .. }) => assert_eq!(mode, 0o750),
            other => panic!("{other:?}"),
        }
        // A symlink on top: not for this layer.
        let linked = layer(t.path(), "linked");
        std::os::unix::fs::symlink("/elsewhere", linked.join("etc")).unwrap();
        assert_eq!(find_etc(&[base.clone(), linked]).unwrap(), None);
        // Nothing anywhere: missing.
        assert_eq!(find_etc(&[empty]).unwrap(), Some(Etc::Missing));
        // Whited out above (an overlay whiteout is a 0/0 char device: root only).
        if nix::unistd::geteuid().is_root() {
            let gone = layer(t.path(), "gone");
            nix::sys::stat::mknod(&gone.join("etc"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
                .unwrap();
            assert_eq!(find_etc(&[base, gone]).unwrap(), Some(Etc::Missing));
        }
    }

    #[test]
    fn only_old_temporaries_are_swept() {
        let t = tempfile::tempdir().unwrap();
        let base = layer(t.path(), "mountpoints");
        let (old, fresh, made) = (layer(&base, ".tmp-old"), layer(&base, ".tmp-fresh"), layer(&base, "0123"));
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for dir in [&old, &made] {
            std::fs::File::open(dir).unwrap().set_modified(hour_ago).unwrap();
        }
        remove_stale_temporaries(t.path());
        assert!(!old.exists() && fresh.exists() && made.exists());
    }

    #[test]
    fn the_layer_copies_etc_and_is_made_once() {
        let t = tempfile::tempdir().unwrap();
        let base = layer(t.path(), "base");
        std::fs::create_dir(base.join("etc")).unwrap();
        std::fs::set_permissions(base.join("etc"), std::fs::Permissions::from_mode(0o751)).unwrap();
        let state = t.path().join("state");
        let made = layer_for(&state, &[base.clone()]).unwrap().unwrap();
        for d in DIRS {
            assert!(made.join(d).is_dir(), "{d}");
        }
        for f in FILES {
            assert_eq!(std::fs::metadata(made.join(f)).unwrap().len(), 0, "{f}");
        }
        let (ours, theirs) = (
            std::fs::metadata(made.join("etc")).unwrap(),
            std::fs::metadata(base.join("etc")).unwrap(),
        );
        assert_eq!(ours.mode() & 0o7777, 0o751);
        assert_eq!((ours.mtime(), ours.mtime_nsec()), (theirs.mtime(), theirs.mtime_nsec()));
        assert_eq!(layer_for(&state, &[base]).unwrap().unwrap(), made, "made once");
        let entries = std::fs::read_dir(state.join("mountpoints")).unwrap().count();
        assert_eq!(entries, 1, "no temporary left");
    }
}

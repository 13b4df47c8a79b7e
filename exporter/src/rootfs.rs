//! The final filesystem of a snapshot chain (`type=local`, `type=tar`).
//!
//! The chain is merged in memory first — path → the layer file that wins —
//! applying each layer in order as overlayfs would: a whiteout removes the
//! path and everything below it, an opaque directory hides everything
//! below it from lower layers, a non-directory replaces a directory's
//! whole subtree. Then the merged tree is copied out or tarred, in sorted
//! depth-first order. Hardlinked files stay hardlinked.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::tarfs::{TarFsWriter, is_opaque_dir, is_whiteout, read_xattrs};

/// The merged view of a chain: relative path → file in the layer that
/// provides it. Ordered depth-first with sorted names.
#[derive(Debug, Default)]
pub struct MergedTree {
    entries: BTreeMap<PathBuf, PathBuf>,
}

impl MergedTree {
    /// Merge the overlay-format layer directories `layers`, base first.
    pub fn from_layers(layers: &[PathBuf]) -> anyhow::Result<MergedTree> {
        let mut tree = MergedTree::default();
        for layer in layers {
            tree.apply(layer, Path::new("")).with_context(|| format!("reading layer {}", layer.display()))?;
        }
        Ok(tree)
    }

    /// Paths in order, with the file each comes from.
    pub fn entries(&self) -> impl Iterator<Item = (&Path, &Path)> {
        self.entries.iter().map(|(k, v)| (k.as_path(), v.as_path()))
    }

    fn remove_below(&mut self, rel: &Path) {
        let doomed: Vec<PathBuf> = self
            .entries
            .range(rel.to_path_buf()..)
            .skip_while(|(k, _)| k.as_path() == rel)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    fn apply(&mut self, dir: &Path, rel_dir: &Path) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let src = entry.path();
            let rel = rel_dir.join(entry.file_name());
            let meta = std::fs::symlink_metadata(&src)?;
            if is_whiteout(&meta) {
                self.remove_below(&rel);
                self.entries.remove(&rel);
                continue;
            }
            let lower_is_dir = self.entries.get(&rel).is_some_and(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()));
            if !meta.is_dir() || !lower_is_dir || is_opaque_dir(&src)? {
                self.remove_below(&rel);
            }
            self.entries.insert(rel.clone(), src.clone());
            if meta.is_dir() {
                self.apply(&src, &rel)?;
            }
        }
        Ok(())
    }

    /// Write the tree as a tar (no whiteouts: it is a final filesystem).
    pub fn write_tar<W: Write>(&self, out: W) -> anyhow::Result<W> {
        let mut tar = TarFsWriter::new(out, None);
        for (rel, src) in self.entries() {
            let name = rel.to_str().with_context(|| format!("file name {rel:?} is not UTF-8"))?;
            tar.append_path(name, src).with_context(|| format!("adding {name} to the tar"))?;
        }
        Ok(tar.finish()?)
    }

    /// Recreate the tree under the existing empty directory `dest`:
    /// contents, types, modes, owners, xattrs, mtimes, hardlinks.
    pub fn copy_to(&self, dest: &Path) -> anyhow::Result<()> {
        let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut dirs = Vec::new();
        for (rel, src) in self.entries() {
            let to = dest.join(rel);
            copy_entry(src, &to, &mut links, &mut dirs).with_context(|| format!("writing {}", to.display()))?;
        }
        // Directory metadata last (children change a directory's mtime),
        // deepest first.
        for (to, meta) in dirs.iter().rev() {
            set_metadata(to, meta).with_context(|| format!("setting metadata of {}", to.display()))?;
        }
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn copy_entry(
    src: &Path,
    to: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    dirs: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to)?;
        copy_xattrs(src, to)?;
        dirs.push((to.to_path_buf(), meta));
        return Ok(());
    }
    if meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return std::fs::hard_link(first, to);
        }
        links.insert((meta.dev(), meta.ino()), to.to_path_buf());
    }
    if ft.is_file() {
        std::fs::copy(src, to)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, to)?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        let kind = if ft.is_char_device() {
            libc::S_IFCHR
        } else if ft.is_block_device() {
            libc::S_IFBLK
        } else {
            libc::S_IFIFO
        };
        // SAFETY: valid C string; mknod has no memory effects.
        check(unsafe { libc::mknod(cstr(to)?.as_ptr(), kind | (meta.mode() & 0o7777), meta.rdev()) })?;
    } else {
        return Ok(()); // sockets are not part of images
    }
    set_metadata(to, &meta)?;
    // The kernel refuses user.* xattrs on symlinks; images carry none.
    if !ft.is_symlink() {
        copy_xattrs(src, to)?;
    }
    Ok(())
}

/// Copy the xattrs of `src` (but overlayfs' own) to `to`.
fn copy_xattrs(src: &Path, to: &Path) -> io::Result<()> {
    let c = cstr(to)?;
    for (name, value) in read_xattrs(src)? {
        let n = CString::new(name)?;
        // SAFETY: valid C strings and a buffer of the given length.
        check(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })?;
    }
    Ok(())
}

/// Owner, then mode (chown clears setuid), then mtime; never following a
/// symlink.
fn set_metadata(to: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    let c = cstr(to)?;
    // SAFETY: valid C string.
    check(unsafe { libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) })?;
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    let times = [
        libc::timespec { tv_sec: meta.atime(), tv_nsec: meta.atime_nsec() },
        libc::timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

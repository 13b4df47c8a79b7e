//! File ops done natively, without a container: COPY/ADD, mkdir, mkfile,
//! rm and symlink written straight into a fresh layer directory.
//!
//! The new layer (the "upper") sits on top of the base chain; every path is
//! resolved in the merged view of both, inside its root (symlinks are
//! followed against the chain's own root, `..` never climbs out). The layer
//! ends up holding exactly the written files plus their parent directories,
//! which are copied up with the lower layers' metadata (or created 0755).
//! Removing a path that exists below writes an overlay whiteout (0/0 char
//! device). Semantics follow BuildKit's file op and Docker's COPY rules.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kiln_cache::layered::{Entry, LayeredView};
use kiln_frontend::graph::{CopyAction, FileAction, Owner};

use crate::pattern::{self, Matcher};
use crate::tree::SourceTree;

/// Apply `actions` in order, writing into the empty layer dir `upper` that
/// sits on the layers `lower` (bottom first). `inputs` are the op's inputs
/// by position (COPY sources refer to them).
pub fn apply(lower: &[PathBuf], upper: &Path, inputs: &[SourceTree], actions: &[FileAction]) -> anyhow::Result<()> {
    let writer = LayerWriter::new(lower, upper);
    for action in actions {
        match action {
            FileAction::Copy(copy) => {
                let src = inputs
                    .get(copy.src_input)
                    .with_context(|| format!("copy reads input {} which the op does not have", copy.src_input))?;
                writer.copy(src, copy)?;
            }
            FileAction::Mkdir { path, mode, make_parents, owner } => writer.mkdir(path, *mode, *make_parents, owner.as_ref())?,
            FileAction::Mkfile { path, data, mode, owner } => writer.mkfile(path, data, *mode, owner.as_ref())?,
            FileAction::Rm { path, allow_not_found } => writer.rm(path, *allow_not_found)?,
            FileAction::Symlink { target, path } => writer.symlink(target, path)?,
        }
    }
    Ok(())
}

/// Owner and mode to give copied files.
#[derive(Clone, Copy)]
struct Attrs {
    /// `Some` to force an owner, `None` to keep the source's.
    owner: Option<(u32, u32)>,
    /// `Some` to force permission bits.
    mode: Option<u32>,
}

struct LayerWriter {
    lower: LayeredView,
    merged: LayeredView,
    upper: PathBuf,
}

impl LayerWriter {
    fn new(lower: &[PathBuf], upper: &Path) -> LayerWriter {
        let mut all = lower.to_vec();
        all.push(upper.to_path_buf());
        LayerWriter { lower: LayeredView::new(lower.to_vec()), merged: LayeredView::new(all), upper: upper.to_path_buf() }
    }

    /// Resolve an absolute path of the image: the parent fully, the last
    /// component per `follow_final`.
    fn resolve(&self, path: &str, follow_final: bool) -> anyhow::Result<PathBuf> {
        self.merged.resolve(Path::new(path), follow_final).with_context(|| format!("resolving {path}"))
    }

    fn up(&self, rel: &Path) -> PathBuf {
        self.upper.join(rel)
    }

    /// Make sure every directory of `rel` (itself included) exists in the
    /// upper: copied up from below with its metadata, or created 0755 with
    /// `owner`.
    fn ensure_dirs(&self, rel: &Path, owner: (u32, u32)) -> anyhow::Result<()> {
        let mut prefix = PathBuf::new();
        for comp in rel.components() {
            prefix.push(comp);
            let up = self.up(&prefix);
            if let Ok(m) = std::fs::symlink_metadata(&up) {
                if m.is_dir() {
                    continue;
                }
                bail!("cannot create directory /{}: a file is in the way", prefix.display());
            }
            match self.merged.lookup(&prefix)? {
                Some(e) if e.metadata.is_dir() => {
                    std::fs::create_dir(&up)?;
                    set_attrs(&up, &e.metadata, Attrs { owner: None, mode: None })?;
                }
                Some(_) => bail!("cannot create directory /{}: not a directory", prefix.display()),
                None => {
                    std::fs::create_dir(&up)?;
                    std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o755))?;
                    lchown(&up, owner.0, owner.1)?;
                }
            }
        }
        Ok(())
    }

    /// Remove whatever the upper holds at `rel`.
    fn clear(&self, rel: &Path) -> anyhow::Result<()> {
        let up = self.up(rel);
        match std::fs::symlink_metadata(&up) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&up)?,
            Ok(_) => std::fs::remove_file(&up)?,
            Err(_) => {}
        }
        Ok(())
    }

    fn exists_below_or_here(&self, rel: &Path) -> anyhow::Result<Option<Entry>> {
        Ok(self.merged.lookup(rel)?)
    }

    // ----- actions -----

    fn mkdir(&self, path: &str, mode: u32, make_parents: bool, owner: Option<&Owner>) -> anyhow::Result<()> {
        let rel = self.resolve(path, true)?;
        let ids = owner.map(|o| resolve_owner(&self.merged, o)).transpose()?.unwrap_or((0, 0));
        match self.exists_below_or_here(&rel)? {
            Some(e) if e.metadata.is_dir() => return Ok(()),
            Some(_) => bail!("mkdir {path}: a file is in the way"),
            None => {}
        }
        if let Some(parent) = rel.parent() {
            if !make_parents && !parent.as_os_str().is_empty() && self.merged.lookup(parent)?.is_none() {
                bail!("mkdir {path}: parent directory does not exist");
            }
            self.ensure_dirs(parent, ids)?;
        }
        let up = self.up(&rel);
        std::fs::create_dir(&up).with_context(|| format!("mkdir {path}"))?;
        std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode))?;
        lchown(&up, ids.0, ids.1)?;
        Ok(())
    }

    fn mkfile(&self, path: &str, data: &[u8], mode: u32, owner: Option<&Owner>) -> anyhow::Result<()> {
        let rel = self.resolve(path, true)?;
        let ids = owner.map(|o| resolve_owner(&self.merged, o)).transpose()?.unwrap_or((0, 0));
        if let Some(parent) = rel.parent() {
            self.ensure_dirs(parent, (0, 0))?;
        }
        self.clear(&rel)?;
        let up = self.up(&rel);
        std::fs::write(&up, data).with_context(|| format!("mkfile {path}"))?;
        std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode))?;
        lchown(&up, ids.0, ids.1)?;
        Ok(())
    }

    fn rm(&self, path: &str, allow_not_found: bool) -> anyhow::Result<()> {
        let rel = self.resolve(path, false)?;
        anyhow::ensure!(!rel.as_os_str().is_empty(), "rm {path}: refusing to remove the root");
        let in_upper = std::fs::symlink_metadata(self.up(&rel)).is_ok();
        let below = self.lower.lookup(&rel)?.is_some();
        if !in_upper && !below {
            if allow_not_found {
                return Ok(());
            }
            bail!("rm {path}: no such file or directory");
        }
        self.clear(&rel)?;
        if below {
            if let Some(parent) = rel.parent() {
                self.ensure_dirs(parent, (0, 0))?;
            }
            write_whiteout(&self.up(&rel))?;
        }
        Ok(())
    }

    fn symlink(&self, target: &str, path: &str) -> anyhow::Result<()> {
        let rel = self.resolve(path, false)?;
        if let Some(parent) = rel.parent() {
            self.ensure_dirs(parent, (0, 0))?;
        }
        self.clear(&rel)?;
        std::os::unix::fs::symlink(target, self.up(&rel)).with_context(|| format!("symlink {path}"))?;
        Ok(())
    }

    fn copy(&self, src: &SourceTree, action: &CopyAction) -> anyhow::Result<()> {
        let mut matches = Vec::new();
        for source in &action.sources {
            let found = src.expand(source)?;
            if found.is_empty() && !(action.allow_empty_wildcard && source.split('/').any(pattern::has_meta)) {
                bail!("copy: source {source:?} not found{}", if src.is_context() { " in the build context (or excluded by .dockerignore)" } else { "" });
            }
            let pivot = parents_pivot(source);
            matches.extend(found.into_iter().map(|m| (m, pivot)));
        }
        let chown = action.owner.as_ref().map(|o| resolve_owner(&self.merged, o)).transpose()?;
        let owner = match chown {
            Some(ids) => Some(ids),
            // Context files belong to root once copied; layer files keep theirs.
            None if src.is_context() => Some((0, 0)),
            None => None,
        };
        // Extracted archives keep the owners in the tar unless --chown.
        let extract_attrs = Attrs { owner: chown, mode: action.mode };
        let attrs = Attrs { owner, mode: action.mode };
        let new_dir_owner = owner.unwrap_or((0, 0));
        let excludes = Matcher::new(&action.exclude)?;

        let dest_str = action.dest.trim_end_matches('/');
        let dest = self.resolve(if dest_str.is_empty() { "/" } else { dest_str }, true)?;
        let dest_is_dir = action.dest.ends_with('/')
            || matches.len() > 1
            || action.parents
            || self.merged.lookup(&dest)?.is_some_and(|e| e.metadata.is_dir());

        for (matched, pivot) in matches {
            let src_rel = src.resolve(&matched, action.follow_symlinks)?;
            let entry = src.lookup(&src_rel)?.with_context(|| format!("copy: {} vanished", matched.display()))?;
            let kept: PathBuf = matched.components().skip(pivot).collect();
            if entry.metadata.is_dir() {
                let target = if action.parents { dest.join(&kept) } else { dest.clone() };
                self.copy_dir_contents(src, &src_rel, &entry, &target, attrs, new_dir_owner, &excludes, action.create_dest_path)?;
                continue;
            }
            let name = matched.file_name().map(PathBuf::from).unwrap_or_default();
            if !excludes.is_empty() && excludes.excluded(&name.to_string_lossy()) {
                continue;
            }
            let into_dir = if action.parents { dest.join(kept.parent().unwrap_or(Path::new(""))) } else { dest.clone() };
            if action.extract_archives && entry.metadata.is_file()
                && let Some(archive) = open_tar(&entry.host_path)? {
                    self.prepare_parent_dir(&into_dir, new_dir_owner, true, action.create_dest_path)?;
                    self.extract(archive, &into_dir, extract_attrs).with_context(|| format!("extracting {}", matched.display()))?;
                    continue;
                }
            let target = if dest_is_dir { into_dir.join(&name) } else { dest.clone() };
            let parent = target.parent().unwrap_or(Path::new(""));
            self.prepare_parent_dir(parent, new_dir_owner, dest_is_dir, action.create_dest_path)?;
            self.put(&entry, &target, attrs)?;
        }
        Ok(())
    }

    /// Make sure `dir` exists as a directory before writing into it.
    fn prepare_parent_dir(&self, dir: &Path, owner: (u32, u32), may_create_last: bool, create_parents: bool) -> anyhow::Result<()> {
        if !create_parents && !may_create_last && self.merged.lookup(dir)?.is_none() {
            bail!("copy: destination directory /{} does not exist", dir.display());
        }
        self.ensure_dirs(dir, owner)
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_dir_contents(
        &self,
        src: &SourceTree,
        src_rel: &Path,
        src_entry: &Entry,
        target: &Path,
        attrs: Attrs,
        new_dir_owner: (u32, u32),
        excludes: &Matcher,
        create_parents: bool,
    ) -> anyhow::Result<()> {
        // The top directory itself is not copied, only created when missing
        // (then with the source directory's metadata).
        match self.merged.lookup(target)? {
            Some(e) if e.metadata.is_dir() => self.ensure_dirs(target, new_dir_owner)?,
            Some(_) => bail!("copy: cannot copy a directory to /{}: a file is in the way", target.display()),
            None => {
                if let Some(parent) = target.parent() {
                    self.prepare_parent_dir(parent, new_dir_owner, true, create_parents)?;
                }
                let up = self.up(target);
                std::fs::create_dir(&up)?;
                set_attrs(&up, &src_entry.metadata, attrs)?;
            }
        }
        let mut dirs_to_stamp = Vec::new();
        let mut stack = vec![(src_rel.to_path_buf(), target.to_path_buf(), PathBuf::new())];
        while let Some((from, to, within)) = stack.pop() {
            for name in src.read_dir(&from)? {
                let child_within = within.join(&name);
                if !excludes.is_empty() && excludes.excluded(&child_within.to_string_lossy()) {
                    continue;
                }
                let child_from = from.join(&name);
                let Some(entry) = src.lookup(&child_from)? else { continue };
                let child_to = to.join(&name);
                if entry.metadata.is_dir() {
                    let up = self.up(&child_to);
                    match std::fs::symlink_metadata(&up) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            self.clear(&child_to)?;
                            std::fs::create_dir(&up)?;
                        }
                        Err(_) => std::fs::create_dir(&up)?,
                    }
                    set_attrs(&up, &entry.metadata, Attrs { mode: attrs.mode, owner: attrs.owner })?;
                    dirs_to_stamp.push((up, entry.metadata.clone()));
                    stack.push((child_from, child_to, child_within));
                } else {
                    self.put(&entry, &child_to, attrs)?;
                }
            }
        }
        // Directory times last: writing children changed them.
        for (dir, meta) in dirs_to_stamp.into_iter().rev() {
            set_mtime(&dir, &meta)?;
        }
        Ok(())
    }

    /// Write one non-directory (or an empty directory) at `target`, whose
    /// parent already exists in the upper.
    fn put(&self, entry: &Entry, target: &Path, attrs: Attrs) -> anyhow::Result<()> {
        let up = self.up(target);
        self.clear(target)?;
        let ft = entry.metadata.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&up)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&entry.host_path)?, &up)?;
        } else if ft.is_file() {
            let mut from = std::fs::File::open(&entry.host_path)
                .with_context(|| format!("reading {}", entry.host_path.display()))?;
            let mut to = std::fs::OpenOptions::new().write(true).create_new(true).open(&up)?;
            std::io::copy(&mut from, &mut to)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else {
                nix::sys::stat::SFlag::S_IFBLK
            };
            nix::sys::stat::mknod(&up, kind, nix::sys::stat::Mode::from_bits_truncate(0o600), entry.metadata.rdev())?;
        } else {
            // Sockets cannot be copied; BuildKit skips them too.
            return Ok(());
        }
        set_attrs(&up, &entry.metadata, attrs)
    }

    fn extract(&self, reader: Box<dyn Read>, into: &Path, attrs: Attrs) -> anyhow::Result<()> {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path()?.to_string_lossy().into_owned();
            let clean = pattern::clean(&raw);
            if clean.is_empty() {
                continue;
            }
            // Resolve the parent inside the root: an archive cannot write
            // through a symlink out of the image.
            let joined = into.join(&clean);
            let parent = self.merged.resolve(joined.parent().unwrap_or(Path::new("")), true)?;
            let target = parent.join(joined.file_name().unwrap_or_default());
            self.ensure_dirs(&parent, attrs.owner.unwrap_or((0, 0)))?;
            let header = entry.header().clone();
            let up = self.up(&target);
            let kind = header.entry_type();
            if kind.is_dir() {
                if !std::fs::symlink_metadata(&up).is_ok_and(|m| m.is_dir()) {
                    self.clear(&target)?;
                    std::fs::create_dir(&up)?;
                }
            } else {
                self.clear(&target)?;
                if kind.is_symlink() {
                    let link = header.link_name()?.context("symlink without target")?;
                    std::os::unix::fs::symlink(link, &up)?;
                } else if kind.is_hard_link() {
                    let link = header.link_name()?.context("hard link without target")?;
                    let link_rel = self.merged.resolve(&into.join(pattern::clean(&link.to_string_lossy())), false)?;
                    std::fs::hard_link(self.up(&link_rel), &up).with_context(|| format!("hard link {raw}"))?;
                    continue;
                } else if kind.is_file() || kind == tar::EntryType::Continuous {
                    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&up)?;
                    std::io::copy(&mut entry, &mut f)?;
                    f.flush()?;
                } else if kind.is_fifo() {
                    nix::unistd::mkfifo(&up, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
                } else {
                    // Devices and other special entries are skipped, as Docker
                    // does when it cannot create them.
                    continue;
                }
            }
            // Some archivers leave numeric fields blank: treat as 0.
            let uid = header.uid().unwrap_or(0) as u32;
            let gid = header.gid().unwrap_or(0) as u32;
            let (uid, gid) = attrs.owner.unwrap_or((uid, gid));
            lchown(&up, uid, gid)?;
            if !kind.is_symlink() {
                let default_mode = if kind.is_dir() { 0o755 } else { 0o644 };
                let mode = attrs.mode.unwrap_or(header.mode().map(|m| m & 0o7777).unwrap_or(default_mode));
                std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode))?;
            }
            let mtime = header.mtime().unwrap_or(0) as i64;
            set_times(&up, mtime, 0)?;
        }
        Ok(())
    }
}

/// With `--parents`, a `/./` in a source marks where the kept path starts;
/// returns how many leading components to drop.
fn parents_pivot(source: &str) -> usize {
    match source.find("/./") {
        Some(i) => pattern::clean(&source[..i]).split('/').filter(|c| !c.is_empty()).count(),
        None => 0,
    }
}

/// Open `path` as a (possibly compressed) tar archive, or `None` when it is
/// not one (then ADD copies it as a plain file).
fn open_tar(path: &Path) -> anyhow::Result<Option<Box<dyn Read>>> {
    let mut magic = [0u8; 6];
    let n = std::fs::File::open(path)?.read(&mut magic)?;
    let magic = &magic[..n];
    let file = std::fs::File::open(path)?;
    let mut reader: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::new(file)?)
    } else if magic.starts_with(b"BZh") {
        decompress_with("bzip2", path)?
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        decompress_with("xz", path)?
    } else {
        Box::new(file)
    };
    // A tar archive has "ustar" at offset 257 of its first header.
    let mut head = vec![0u8; 512];
    let mut filled = 0;
    while filled < head.len() {
        match reader.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(_) => return Ok(None),
        }
    }
    if filled < 512 || &head[257..262] != b"ustar" {
        return Ok(None);
    }
    Ok(Some(Box::new(std::io::Cursor::new(head).chain(reader))))
}

/// bzip2 and xz are rare in ADD: the system tools decompress them rather
/// than two more crates.
fn decompress_with(tool: &str, path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let child = std::process::Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("ADD of a {tool} archive needs the `{tool}` tool"))?;
    Ok(Box::new(child.stdout.context("no stdout")?))
}

/// Resolve `--chown` names against the image's `/etc/passwd` and `/etc/group`.
pub fn resolve_owner(view: &LayeredView, owner: &Owner) -> anyhow::Result<(u32, u32)> {
    let read = |file: &str| -> String {
        view.resolve(Path::new(file), true)
            .ok()
            .and_then(|p| view.lookup(&p).ok().flatten())
            .and_then(|e| std::fs::read_to_string(e.host_path).ok())
            .unwrap_or_default()
    };
    let (uid, primary_gid) = match owner.user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let passwd = read("/etc/passwd");
            let line = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 4 && f[0] == owner.user)
                .with_context(|| format!("unable to find user {}: no matching entries in passwd file", owner.user))?;
            let uid = line[2].parse().with_context(|| format!("bad uid for user {} in /etc/passwd", owner.user))?;
            let gid = line[3].parse().with_context(|| format!("bad gid for user {} in /etc/passwd", owner.user))?;
            (uid, gid)
        }
    };
    let gid = match &owner.group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = read("/etc/group");
                group
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 3 && f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .with_context(|| format!("unable to find group {g}: no matching entries in group file"))?
            }
        },
    };
    Ok((uid, gid))
}

fn write_whiteout(path: &Path) -> anyhow::Result<()> {
    nix::sys::stat::mknod(path, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
        .with_context(|| format!("writing whiteout {}", path.display()))?;
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
    Ok(())
}

/// Give `path` the owner, mode and mtime of `meta` (as overridden by `attrs`).
fn set_attrs(path: &Path, meta: &std::fs::Metadata, attrs: Attrs) -> anyhow::Result<()> {
    let (uid, gid) = attrs.owner.unwrap_or((meta.uid(), meta.gid()));
    lchown(path, uid, gid)?;
    if !meta.file_type().is_symlink() {
        let mode = attrs.mode.unwrap_or(meta.mode() & 0o7777);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    set_mtime(path, meta)
}

fn set_mtime(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    set_times(path, meta.mtime(), meta.mtime_nsec())
}

fn set_times(path: &Path, secs: i64, nsecs: i64) -> anyhow::Result<()> {
    let ts = nix::sys::time::TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(None, path, &ts, &ts, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("setting times of {}", path.display()))?;
    Ok(())
}

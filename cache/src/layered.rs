//! A merged, read-only view of a chain of layer directories — what overlayfs
//! would show — computed without mounting anything.
//!
//! Layers are in overlay format, bottom first: a 0/0 character device is a
//! whiteout (the name is deleted from the layers below), a directory with
//! the `trusted.overlay.opaque=y` xattr hides everything below it, and a
//! non-directory hides a directory of the same name below. The view answers
//! three questions: what is at a path ([`LayeredView::lookup`]), what a
//! directory holds ([`LayeredView::read_dir`]) and where a path leads once
//! its symlinks are followed ([`LayeredView::resolve`]) — always inside the
//! view's own root, never escaping through `..` or absolute link targets.
//!
//! A plain host directory (a build context) is a one-layer view made with
//! [`LayeredView::plain`]: there, nothing is interpreted as a whiteout.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Maximum number of symlinks followed while resolving one path (as Linux).
const MAX_SYMLINKS: usize = 40;

/// A read-only merged view of layer directories (bottom first).
#[derive(Debug, Clone)]
pub struct LayeredView {
    layers: Vec<PathBuf>,
    overlay: bool,
}

/// Something found in a [`LayeredView`].
#[derive(Debug, Clone)]
pub struct Entry {
    /// Host path of the entry in the topmost layer that has it: read file
    /// contents and link targets from here.
    pub host_path: PathBuf,
    /// `lstat` of `host_path`.
    pub metadata: Metadata,
    /// Index of that layer (0 = bottom).
    pub layer: usize,
}

/// What one layer says about one path.
#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum LayerState {
    /// The layer says nothing: look further down.
    Absent,
    /// Absent here, and an opaque dir on the way hides the layers below.
    AbsentOpaque,
    /// Deleted (whiteout), or hidden by a non-directory on the way.
    Hidden,
    /// Present, with metadata and whether it is an opaque directory.
    Present(PathBuf, Metadata, bool),
}

impl LayeredView {
    /// A view over overlay-format layers, bottom first.
    pub fn new(layers: Vec<PathBuf>) -> Self {
        LayeredView { layers, overlay: true }
    }

    /// A view over one plain directory: no whiteouts, no opaque dirs.
    pub fn plain(dir: PathBuf) -> Self {
        LayeredView { layers: vec![dir], overlay: false }
    }

    /// The layer directories, bottom first.
    pub fn layers(&self) -> &[PathBuf] {
        &self.layers
    }

    /// `lstat` of `path` (relative to the view's root; a leading `/` is
    /// ignored) in the merged view, without following a final symlink.
    /// Intermediate components are taken literally: call [`Self::resolve`]
    /// first when they may be symlinks. `None` when nothing is there.
    pub fn lookup(&self, path: &Path) -> io::Result<Option<Entry>> {
        let comps = normal_components(path)?;
        for layer in (0..self.layers.len()).rev() {
            match self.layer_state(layer, &comps)? {
                LayerState::Absent => continue,
                LayerState::AbsentOpaque | LayerState::Hidden => return Ok(None),
                LayerState::Present(host_path, metadata, _) => {
                    return Ok(Some(Entry { host_path, metadata, layer }));
                }
            }
        }
        if comps.is_empty() {
            // The root always exists, even in an empty chain.
            if let Some(first) = self.layers.first() {
                let metadata = std::fs::symlink_metadata(first)?;
                return Ok(Some(Entry { host_path: first.clone(), metadata, layer: 0 }));
            }
        }
        Ok(None)
    }

    /// Names in directory `path` of the merged view, sorted. Whiteouts and
    /// names hidden by them are left out. Errors with `NotFound` when
    /// `path` is not a directory of the view.
    pub fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        Ok(self.read_dir_entries(path)?.into_iter().map(|(name, _)| name).collect())
    }

    /// [`Self::read_dir`] with, for each name, the entry [`Self::lookup`]
    /// would return for it — taken from the directory listing itself, so a
    /// walk costs one `lstat` per entry instead of one per path component.
    pub fn read_dir_entries(&self, path: &Path) -> io::Result<Vec<(OsString, Entry)>> {
        let comps = normal_components(path)?;
        let mut seen: BTreeSet<OsString> = BTreeSet::new();
        // The topmost layer holding a name is the one lookup finds: layers
        // are listed top first, and a name is taken at its first sighting.
        let mut visible: std::collections::BTreeMap<OsString, Entry> = std::collections::BTreeMap::new();
        let mut found_dir = comps.is_empty();
        for layer in (0..self.layers.len()).rev() {
            let (dir, opaque) = match self.layer_state(layer, &comps)? {
                LayerState::Absent => continue,
                LayerState::AbsentOpaque | LayerState::Hidden => break,
                LayerState::Present(p, m, opaque) => {
                    if !m.is_dir() {
                        if found_dir {
                            break;
                        }
                        return Err(io::Error::new(io::ErrorKind::NotFound, "not a directory"));
                    }
                    (p, opaque)
                }
            };
            found_dir = true;
            if self.layers.len() == 1 {
                // One layer (a build context): nothing to merge, so no
                // name sets, just the listing sorted.
                let mut listed = Vec::new();
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    if !(self.overlay && is_whiteout(&meta)) {
                        listed.push((entry.file_name(), Entry { host_path: entry.path(), metadata: meta, layer }));
                    }
                }
                listed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                return Ok(listed);
            }
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if !seen.insert(name.clone()) {
                    continue;
                }
                let meta = entry.metadata()?;
                if !(self.overlay && is_whiteout(&meta)) {
                    visible.insert(name, Entry { host_path: entry.path(), metadata: meta, layer });
                }
            }
            if opaque {
                break;
            }
        }
        if !found_dir {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display())));
        }
        Ok(visible.into_iter().collect())
    }

    /// Resolve `path` inside the view: `..` never climbs above the root,
    /// and symlinks (absolute or relative) are followed relative to the
    /// view's own root. The final component is followed only when
    /// `follow_final`. Returns a clean relative path (empty = the root);
    /// components that do not exist are kept as they are.
    pub fn resolve(&self, path: &Path, follow_final: bool) -> io::Result<PathBuf> {
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, path);
        let mut resolved: Vec<OsString> = Vec::new();
        let mut links = 0;
        // `pending` is a stack: the next component is at the end.
        pending.reverse();
        while let Some(comp) = pending.pop() {
            if comp == ".." {
                resolved.pop();
                continue;
            }
            if comp == "." || comp.is_empty() {
                continue;
            }
            resolved.push(comp);
            let is_last = pending.is_empty();
            if is_last && !follow_final {
                break;
            }
            let candidate: PathBuf = resolved.iter().collect();
            let Some(entry) = self.lookup(&candidate)? else {
                continue;
            };
            if !entry.metadata.file_type().is_symlink() {
                continue;
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(io::Error::other(format!("too many levels of symbolic links in {}", path.display())));
            }
            let target = std::fs::read_link(&entry.host_path)?;
            resolved.pop();
            if target.is_absolute() {
                resolved.clear();
            }
            let mut more = Vec::new();
            push_components(&mut more, &target);
            pending.extend(more.into_iter().rev());
        }
        Ok(resolved.iter().collect())
    }

    fn layer_state(&self, layer: usize, comps: &[OsString]) -> io::Result<LayerState> {
        let mut p = self.layers[layer].clone();
        let mut opaque_above = false;
        for (i, comp) in comps.iter().enumerate() {
            p.push(comp);
            let meta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Ok(if opaque_above { LayerState::AbsentOpaque } else { LayerState::Absent });
                }
                Err(e) => return Err(e),
            };
            if self.overlay && is_whiteout(&meta) {
                return Ok(LayerState::Hidden);
            }
            let opaque = self.overlay && meta.is_dir() && is_opaque(&p);
            if i + 1 == comps.len() {
                return Ok(LayerState::Present(p, meta, opaque));
            }
            if !meta.is_dir() {
                return Ok(LayerState::Hidden);
            }
            opaque_above |= opaque;
        }
        // The root of the layer itself.
        let meta = std::fs::symlink_metadata(&p)?;
        let opaque = self.overlay && is_opaque(&p);
        Ok(LayerState::Present(p, meta, opaque))
    }
}

/// Whether `meta` is an overlay whiteout: a character device 0/0.
pub fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Whether directory `path` carries `trusted.overlay.opaque=y`.
pub fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: valid NUL-terminated path and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// Components of a relative (or rooted) path with `.` dropped; `..` is
/// refused because lookups take literal, already-resolved paths.
fn normal_components(path: &Path) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("path {} must be resolved first (contains ..)", path.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn push_components(out: &mut Vec<OsString>, path: &Path) {
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => out.push("..".into()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(path, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
            .expect("mknod whiteout (needs root)");
    }

    fn set_opaque(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path and value.
        let rc = unsafe {
            libc::lsetxattr(cpath.as_ptr(), c"trusted.overlay.opaque".as_ptr(), b"y".as_ptr().cast(), 1, 0)
        };
        assert_eq!(rc, 0, "setxattr: {}", io::Error::last_os_error());
    }

    #[test]
    fn whiteouts_opaque_dirs_and_shadowing() {
        let tmp = tempfile::tempdir().unwrap();
        let (l0, l1, l2) = (tmp.path().join("l0"), tmp.path().join("l1"), tmp.path().join("l2"));
        for d in [&l0, &l1, &l2] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(l0.join("etc/sub")).unwrap();
        std::fs::write(l0.join("etc/a"), "a0").unwrap();
        std::fs::write(l0.join("etc/b"), "b0").unwrap();
        std::fs::write(l0.join("etc/sub/x"), "x").unwrap();
        std::fs::create_dir_all(l0.join("opq")).unwrap();
        std::fs::write(l0.join("opq/old"), "old").unwrap();
        std::fs::create_dir_all(l0.join("dir2file")).unwrap();
        std::fs::write(l0.join("dir2file/inner"), "i").unwrap();

        std::fs::create_dir_all(l1.join("etc")).unwrap();
        std::fs::write(l1.join("etc/a"), "a1").unwrap();
        whiteout(&l1.join("etc/b"));
        whiteout(&l1.join("etc/sub"));
        std::fs::create_dir_all(l1.join("opq")).unwrap();
        set_opaque(&l1.join("opq"));
        std::fs::write(l1.join("opq/new"), "new").unwrap();
        std::fs::write(l1.join("dir2file"), "now a file").unwrap();

        std::fs::create_dir_all(l2.join("etc/sub")).unwrap();
        std::fs::write(l2.join("etc/sub/y"), "y").unwrap();

        let view = LayeredView::new(vec![l0, l1, l2]);
        let a = view.lookup(Path::new("/etc/a")).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&a.host_path).unwrap(), "a1");
        assert_eq!(a.layer, 1);
        assert!(view.lookup(Path::new("etc/b")).unwrap().is_none());
        assert!(view.lookup(Path::new("etc/sub/x")).unwrap().is_none(), "whiteout hides lower dir content");
        assert!(view.lookup(Path::new("etc/sub/y")).unwrap().is_some());
        assert!(view.lookup(Path::new("opq/old")).unwrap().is_none(), "opaque dir hides lower content");
        assert!(view.lookup(Path::new("dir2file/inner")).unwrap().is_none(), "file hides lower dir");
        assert!(view.lookup(Path::new("dir2file")).unwrap().unwrap().metadata.is_file());

        let names = |p: &str| -> Vec<String> {
            view.read_dir(Path::new(p)).unwrap().into_iter().map(|n| n.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names("etc"), ["a", "sub"]);
        assert_eq!(names("etc/sub"), ["y"]);
        assert_eq!(names("opq"), ["new"]);
        assert_eq!(names("/"), ["dir2file", "etc", "opq"]);

        // Each listed entry is exactly what lookup finds at that path.
        for dir in ["/", "etc", "etc/sub", "opq"] {
            for (name, entry) in view.read_dir_entries(Path::new(dir)).unwrap() {
                let path = Path::new(dir).join(&name);
                let looked = view.lookup(&path).unwrap().expect("a listed name exists");
                assert_eq!(entry.host_path, looked.host_path, "{}", path.display());
                assert_eq!(entry.layer, looked.layer, "{}", path.display());
                assert_eq!(entry.metadata.ino(), looked.metadata.ino(), "{}", path.display());
            }
        }
    }

    #[test]
    fn a_plain_listing_is_sorted_and_agrees_with_lookup() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["b", "a", "C", "c"] {
            std::fs::write(tmp.path().join(name), name).unwrap();
        }
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        symlink("a", tmp.path().join("link")).unwrap();
        let view = LayeredView::plain(tmp.path().to_path_buf());
        let listed = view.read_dir_entries(Path::new("")).unwrap();
        let names: Vec<_> = listed.iter().map(|(n, _)| n.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["C", "a", "b", "c", "dir", "link"]);
        for (name, entry) in listed {
            let looked = view.lookup(Path::new(&name)).unwrap().unwrap();
            assert_eq!((entry.host_path, entry.metadata.ino()), (looked.host_path, looked.metadata.ino()));
            assert_eq!(entry.metadata.file_type(), looked.metadata.file_type());
        }
    }

    #[test]
    fn resolve_stays_inside_root() {
        let tmp = tempfile::tempdir().unwrap();
        let l0 = tmp.path().join("l0");
        std::fs::create_dir_all(l0.join("usr/lib")).unwrap();
        symlink("/usr/lib", l0.join("lib")).unwrap();
        symlink("../../../../etc", l0.join("usr/escape")).unwrap();
        symlink("loop2", l0.join("loop1")).unwrap();
        symlink("loop1", l0.join("loop2")).unwrap();
        let view = LayeredView::new(vec![l0]);
        assert_eq!(view.resolve(Path::new("/lib/x.so"), true).unwrap(), PathBuf::from("usr/lib/x.so"));
        assert_eq!(view.resolve(Path::new("/usr/escape/passwd"), true).unwrap(), PathBuf::from("etc/passwd"));
        assert_eq!(view.resolve(Path::new("../../a/./b/.."), true).unwrap(), PathBuf::from("a"));
        assert_eq!(view.resolve(Path::new("lib"), false).unwrap(), PathBuf::from("lib"));
        assert!(view.resolve(Path::new("loop1/x"), true).is_err());
    }
}

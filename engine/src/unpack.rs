//! Safe layer unpacking: a layer blob (gzip, zstd or plain tar) becomes a
//! snapshot directory in overlayfs format.
//!
//! - Whiteouts are converted as overlayfs expects them: `.wh.NAME` becomes a
//!   0/0 character device `NAME`, `.wh..wh..opq` becomes the xattr
//!   `trusted.overlay.opaque=y` on its directory.
//! - Hardlinks, symlinks, device nodes, FIFOs, xattrs, ownership, modes and
//!   mtimes are kept.
//! - Nothing can land outside the target: every path is resolved by walking
//!   its components with `openat(O_NOFOLLOW)` from a directory fd of the
//!   root, never by joining strings. `..`, absolute paths, a symlink used as
//!   a directory (the "symlink, then write through it" attack) and hardlinks
//!   to anything outside are refused with an [`UnpackError`] naming the entry.
//! - The diff ID (sha256 of the uncompressed tar) is computed while the
//!   bytes stream through, never by a second read.
//!
//! [`unpack_layer_snapshot`] does the store-side work: it keys snapshots by
//! diff ID (`sha256-<hex>`), unpacks each layer once even when several
//! processes ask at the same time (a per-layer lock), and shares it.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use kiln_cache::Store;
use kiln_cache::snapshots::{BlobRecord, SnapshotMeta};
use sha2::{Digest as _, Sha256};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The entry would write outside the target or is otherwise unsafe.
    #[error("layer entry {entry:?}: {reason}")]
    Unsafe {
        /// The entry's path as written in the tar.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filesystem error while creating the entry.
    #[error("layer entry {entry:?}: {source}")]
    Io {
        /// The entry's path as written in the tar.
        entry: String,
        /// The error.
        source: std::io::Error,
    },
    /// The layer stream itself is unreadable (bad compression, bad tar).
    #[error("reading layer: {0}")]
    Read(std::io::Error),
    /// The uncompressed layer does not hash to the diff ID the image config
    /// announces.
    #[error("layer diff ID mismatch: the image config says {expected}, the layer is {actual}")]
    DiffIdMismatch {
        /// Diff ID from the image config.
        expected: String,
        /// Digest of the uncompressed tar.
        actual: String,
    },
}

/// Compression of a layer blob, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

/// Look at the first bytes of `reader` (without consuming them).
pub fn detect_compression<R: BufRead>(reader: &mut R) -> std::io::Result<Compression> {
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// What [`unpack`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackSummary {
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Number of tar entries applied.
    pub entries: u64,
}

/// Unpack the layer in `blob` (any of the [`Compression`]s) into the
/// existing, empty directory `target`, in overlay format. On error `target`
/// is left partly filled: callers unpack into a prepared snapshot and throw
/// it away on failure.
pub fn unpack(blob: impl Read, target: &Path) -> Result<UnpackSummary, UnpackError> {
    let mut buffered = BufReader::with_capacity(256 * 1024, blob);
    let compression = detect_compression(&mut buffered).map_err(UnpackError::Read)?;
    let tar_stream: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Read)?),
    };
    unpack_tar(tar_stream, target)
}

/// Unpack an uncompressed tar stream into `target` (see [`unpack`]).
pub fn unpack_tar(tar_stream: impl Read, target: &Path) -> Result<UnpackSummary, UnpackError> {
    let root = open_dir_path(target).map_err(|source| UnpackError::Io { entry: ".".into(), source })?;
    let mut archive = tar::Archive::new(HashingReader { inner: tar_stream, hasher: Sha256::new() });
    let mut dir_times: Vec<DeferredDirTimes> = Vec::new();
    let mut entries = 0u64;
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        entries += 1;
        if let Some(dir) = apply_entry(&root, &mut entry)? {
            dir_times.push(dir);
        }
    }
    // Directory mtimes last: creating their children changed them.
    for (components, times) in dir_times.iter().rev() {
        let entry = String::from_utf8_lossy(&components.join(&b'/')).into_owned();
        let (parent, name) = match components.split_last() {
            Some((name, parents)) => (walk(&root, parents, &entry, false)?, name),
            None => continue,
        };
        set_times(parent.as_raw_fd(), name, times).map_err(|source| UnpackError::Io { entry, source })?;
    }
    // The end-of-archive blocks and any padding belong to the diff ID too.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(UnpackError::Read)?;
    Ok(UnpackSummary { diff_id: format!("sha256:{}", hex::encode(rest.hasher.finalize())), entries })
}

/// A directory (as path components) and the times to give it at the end.
type DeferredDirTimes = (Vec<Vec<u8>>, Times);

#[derive(Debug, Clone, Copy)]
struct Times {
    secs: i64,
    nanos: i64,
}

/// Apply one tar entry. Returns the directory and its times when the entry
/// is a directory whose mtime must be set at the end.
fn apply_entry<R: Read>(
    root: &OwnedFd,
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<DeferredDirTimes>, UnpackError> {
    let raw_path = entry.path_bytes().into_owned();
    let name_for_errors = String::from_utf8_lossy(&raw_path).into_owned();
    let unsafe_entry =
        |reason: &str| UnpackError::Unsafe { entry: name_for_errors.clone(), reason: reason.to_string() };
    let io_err = |source: std::io::Error| UnpackError::Io { entry: name_for_errors.clone(), source };

    let components = split_path(&raw_path).map_err(unsafe_entry)?;
    let kind = entry.header().entry_type();
    let Some((name, parents)) = components.split_last() else {
        return Ok(None); // the root itself ("./"): nothing to create
    };

    // PAX records override the classic header fields.
    let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
    let header = entry.header().clone();
    let mut uid = header.uid().map_err(UnpackError::Read)?;
    let mut gid = header.gid().map_err(UnpackError::Read)?;
    let mut times = Times { secs: header.mtime().map_err(UnpackError::Read)? as i64, nanos: 0 };
    if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
        for ext in pax {
            let ext = ext.map_err(UnpackError::Read)?;
            let Ok(key) = ext.key() else { continue };
            if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((xattr.to_string(), ext.value_bytes().to_vec()));
            } else if key == "uid" {
                uid = parse_pax_number(ext.value_bytes()).unwrap_or(uid);
            } else if key == "gid" {
                gid = parse_pax_number(ext.value_bytes()).unwrap_or(gid);
            } else if key == "mtime"
                && let Some(t) = parse_pax_time(ext.value_bytes())
            {
                times = t;
            }
        }
    }
    let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;

    let parent = walk(root, parents, &name_for_errors, true)?;
    let pfd = parent.as_raw_fd();

    // Whiteouts.
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        if hidden == b".wh..opq" {
            set_xattr(pfd, None, "trusted.overlay.opaque", b"y").map_err(io_err)?;
            return Ok(None);
        }
        if hidden.starts_with(b".wh.") {
            return Ok(None); // other AUFS metadata (.wh..wh.plnk ...) means nothing to overlay
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(unsafe_entry("whiteout of an invalid name"));
        }
        remove_existing(pfd, hidden).map_err(io_err)?;
        mknod(pfd, hidden, libc::S_IFCHR, 0).map_err(io_err)?;
        return Ok(None);
    }

    let existing = lstat_at(pfd, name).map_err(io_err)?;
    let is_dir_entry = kind == tar::EntryType::Directory;
    match existing {
        Some(st) if is_dir_entry && (st.st_mode & libc::S_IFMT) == libc::S_IFDIR => {}
        Some(_) => remove_existing(pfd, name).map_err(io_err)?,
        None => {}
    }

    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let fd = openat(pfd, name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, 0o600)
                .map_err(io_err)?;
            let mut file = File::from(fd);
            std::io::copy(entry, &mut file).map_err(io_err)?;
        }
        tar::EntryType::Directory => {
            if existing.is_none() {
                mkdirat(pfd, name, 0o700).map_err(io_err)?;
            }
        }
        tar::EntryType::Symlink => {
            let target = entry.link_name_bytes().ok_or_else(|| unsafe_entry("symlink without a target"))?;
            // The target is stored, never followed here, so it may point anywhere.
            symlinkat(&target, pfd, name).map_err(io_err)?;
        }
        tar::EntryType::Link => {
            let link = entry.link_name_bytes().ok_or_else(|| unsafe_entry("hardlink without a target"))?.into_owned();
            let link_components = split_path(&link)
                .map_err(|r| unsafe_entry(&format!("hardlink target {:?}: {r}", String::from_utf8_lossy(&link))))?;
            let Some((src_name, src_parents)) = link_components.split_last() else {
                return Err(unsafe_entry("hardlink to the root directory"));
            };
            let src_parent = walk(root, src_parents, &name_for_errors, false)?;
            match lstat_at(src_parent.as_raw_fd(), src_name).map_err(io_err)? {
                None => {
                    return Err(unsafe_entry(&format!(
                        "hardlink target {:?} is not in the layer",
                        String::from_utf8_lossy(&link)
                    )));
                }
                Some(st) if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR => {
                    return Err(unsafe_entry("hardlink to a directory"));
                }
                Some(_) => {}
            }
            linkat(src_parent.as_raw_fd(), src_name, pfd, name).map_err(io_err)?;
            // A hardlink shares the inode: its metadata is the target's.
            return Ok(None);
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let major = header.device_major().map_err(UnpackError::Read)?.unwrap_or(0);
            let minor = header.device_minor().map_err(UnpackError::Read)?.unwrap_or(0);
            let fmt = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            mknod(pfd, name, fmt, libc::makedev(major, minor)).map_err(io_err)?;
        }
        other => return Err(unsafe_entry(&format!("unsupported tar entry type {other:?}"))),
    }

    // Ownership, then mode (chown clears set-id bits), xattrs, times.
    let is_symlink = kind == tar::EntryType::Symlink;
    chown_at(pfd, name, uid as u32, gid as u32).map_err(io_err)?;
    if !is_symlink {
        chmod_at(pfd, name, mode).map_err(io_err)?;
    }
    for (key, value) in &xattrs {
        // overlayfs' own attributes could redirect lookups; only whiteout
        // conversion above may set them.
        if key.starts_with("trusted.overlay.") {
            tracing::warn!(entry = %name_for_errors, xattr = %key, "ignoring overlay xattr in layer");
            continue;
        }
        match set_xattr(pfd, Some(name), key, value) {
            Ok(()) => {}
            // Some attributes cannot live on some files (user.* on a
            // symlink) or this filesystem: losing one beats failing the pull.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP)) => {
                tracing::warn!(entry = %name_for_errors, xattr = %key, error = %e, "xattr not kept");
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    if is_dir_entry {
        return Ok(Some((components, times)));
    }
    set_times(pfd, name, &times).map_err(io_err)?;
    Ok(None)
}

/// Split a tar path into components: `.` and empty ones dropped; `..` and
/// absolute paths refused.
fn split_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains `..`"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// Open the directory `components` below `root` one component at a time
/// with `O_NOFOLLOW`; a symlink or non-directory on the way is refused.
/// With `create`, missing directories are made (mode 0755, as tar does).
fn walk(root: &OwnedFd, components: &[Vec<u8>], entry: &str, create: bool) -> Result<OwnedFd, UnpackError> {
    let mut current = dup(root).map_err(|source| UnpackError::Io { entry: entry.into(), source })?;
    for (i, comp) in components.iter().enumerate() {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let next = match openat(current.as_raw_fd(), comp, flags, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                match mkdirat(current.as_raw_fd(), comp, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(source) => return Err(UnpackError::Io { entry: entry.into(), source }),
                }
                openat(current.as_raw_fd(), comp, flags, 0)
            }
            other => other,
        };
        current = next.map_err(|e| {
            let so_far = String::from_utf8_lossy(&components[..=i].join(&b'/')).into_owned();
            match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => UnpackError::Unsafe {
                    entry: entry.into(),
                    reason: format!("{so_far:?} is a symlink or not a directory; refusing to write through it"),
                },
                Some(libc::ENOENT) => UnpackError::Unsafe {
                    entry: entry.into(),
                    reason: format!("{so_far:?} does not exist in the layer"),
                },
                _ => UnpackError::Io { entry: entry.into(), source: e },
            }
        })?;
    }
    Ok(current)
}

fn open_dir_path(path: &Path) -> std::io::Result<OwnedFd> {
    let file = File::open(path)?;
    ensure_dir(&file)?;
    Ok(OwnedFd::from(file))
}

fn ensure_dir(file: &File) -> std::io::Result<()> {
    if file.metadata()?.is_dir() { Ok(()) } else { Err(std::io::Error::from_raw_os_error(libc::ENOTDIR)) }
}

fn cstr(name: &[u8]) -> std::io::Result<CString> {
    CString::new(name).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn dup(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.try_clone()
}

fn openat(dir: RawFd, name: &[u8], flags: libc::c_int, mode: libc::mode_t) -> std::io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: valid C string and fd; the returned fd is owned by us.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: fd was just returned by openat and is not shared.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdirat(dir: RawFd, name: &[u8], mode: libc::mode_t) -> std::io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: valid C string and fd.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

fn mknod(dir: RawFd, name: &[u8], fmt: libc::mode_t, dev: libc::dev_t) -> std::io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: valid C string and fd.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), fmt | 0o600, dev) }).map(drop)
}

fn symlinkat(target: &[u8], dir: RawFd, name: &[u8]) -> std::io::Result<()> {
    let (target, name) = (cstr(target)?, cstr(name)?);
    // SAFETY: valid C strings and fd.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

fn linkat(src_dir: RawFd, src: &[u8], dst_dir: RawFd, dst: &[u8]) -> std::io::Result<()> {
    let (src, dst) = (cstr(src)?, cstr(dst)?);
    // SAFETY: valid C strings and fds. Flags 0: a symlink source is linked
    // itself, never followed.
    check(unsafe { libc::linkat(src_dir, src.as_ptr(), dst_dir, dst.as_ptr(), 0) }).map(drop)
}

fn lstat_at(dir: RawFd, name: &[u8]) -> std::io::Result<Option<libc::stat>> {
    let name = cstr(name)?;
    // SAFETY: st is plain data filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string, fd and out pointer.
    match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove whatever is at `name` in `dir` (a whole tree if it is a directory).
fn remove_existing(dir: RawFd, name: &[u8]) -> std::io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else { return Ok(()) };
    let cname = cstr(name)?;
    if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
        let sub = openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        let children: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))?
            .map(|e| e.map(|e| std::os::unix::ffi::OsStrExt::as_bytes(e.file_name().as_os_str()).to_vec()))
            .collect::<Result<_, _>>()?;
        for child in children {
            remove_existing(sub.as_raw_fd(), &child)?;
        }
        // SAFETY: valid C string and fd.
        check(unsafe { libc::unlinkat(dir, cname.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    } else {
        // SAFETY: valid C string and fd.
        check(unsafe { libc::unlinkat(dir, cname.as_ptr(), 0) }).map(drop)
    }
}

fn chown_at(dir: RawFd, name: &[u8], uid: u32, gid: u32) -> std::io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: valid C string and fd.
    check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

fn chmod_at(dir: RawFd, name: &[u8], mode: u32) -> std::io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: valid C string and fd. The entry was just created by us and
    // is not a symlink (callers skip symlinks), so following is harmless.
    check(unsafe { libc::fchmodat(dir, name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

fn set_times(dir: RawFd, name: &[u8], t: &Times) -> std::io::Result<()> {
    let name = cstr(name)?;
    let ts = libc::timespec { tv_sec: t.secs as libc::time_t, tv_nsec: t.nanos as _ };
    let times = [ts, ts];
    // SAFETY: valid C string, fd and a two-element timespec array.
    check(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// Set an xattr on `name` in `dir` (not following symlinks), or on `dir`
/// itself when `name` is `None`.
fn set_xattr(dir: RawFd, name: Option<&[u8]>, key: &str, value: &[u8]) -> std::io::Result<()> {
    let ckey = cstr(key.as_bytes())?;
    match name {
        None => {
            // SAFETY: valid fd, C string and buffer.
            check(unsafe { libc::fsetxattr(dir, ckey.as_ptr(), value.as_ptr().cast(), value.len(), 0) }).map(drop)
        }
        Some(name) => {
            // /proc/self/fd/<dir> names the directory we hold open, so no
            // path outside our walk is involved; lsetxattr does not follow
            // the final component.
            let mut path = format!("/proc/self/fd/{dir}/").into_bytes();
            path.extend_from_slice(name);
            let path = cstr(&path)?;
            // SAFETY: valid C strings and buffer.
            check(unsafe { libc::lsetxattr(path.as_ptr(), ckey.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
                .map(drop)
        }
    }
}

fn parse_pax_number(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn parse_pax_time(v: &[u8]) -> Option<Times> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some(Times { secs, nanos: digits.parse().ok()? })
}

/// The snapshot id of the layer with diff ID `sha256:<hex>`: `sha256-<hex>`.
pub fn snapshot_id_for_diff_id(diff_id: &str) -> anyhow::Result<String> {
    let hex = kiln_cache::content::digest_hex(diff_id)?;
    Ok(format!("sha256-{hex}"))
}

/// Make sure the layer blob `blob` (already in the content store) is
/// unpacked into a snapshot and return the snapshot id (`sha256-<diff hex>`).
///
/// With `expected_diff_id` (from the image config) an existing snapshot is
/// reused without touching the blob, and a layer that does not hash to it is
/// an error. Concurrent callers (threads or processes) unpack a layer once:
/// the others wait on its lock and then find the snapshot.
pub fn unpack_layer_snapshot(
    store: &Store,
    blob: &BlobRecord,
    expected_diff_id: Option<&str>,
) -> anyhow::Result<String> {
    let lock_key = match expected_diff_id {
        Some(d) => kiln_cache::content::digest_hex(d)?.to_string(),
        None => kiln_cache::content::digest_hex(&blob.digest)?.to_string(),
    };
    let _lock = store.lock(&format!("layer-{lock_key}"))?;
    if let Some(diff_id) = expected_diff_id {
        let id = snapshot_id_for_diff_id(diff_id)?;
        if store.snapshots.exists(&id) {
            remember_blob(store, &id, blob)?;
            return Ok(id);
        }
    }
    let file = store.content.open_blob(&blob.digest)?;
    let active = store.snapshots.prepare()?;
    let summary = match unpack(file, &active.fs()) {
        Ok(s) => s,
        Err(e) => {
            store.snapshots.abort(active);
            return Err(anyhow::Error::new(e).context(format!("unpacking layer {}", blob.digest)));
        }
    };
    if let Some(expected) = expected_diff_id
        && expected != summary.diff_id
    {
        store.snapshots.abort(active);
        return Err(UnpackError::DiffIdMismatch { expected: expected.to_string(), actual: summary.diff_id }.into());
    }
    let id = snapshot_id_for_diff_id(&summary.diff_id)?;
    if store.snapshots.exists(&id) {
        store.snapshots.abort(active);
        remember_blob(store, &id, blob)?;
        return Ok(id);
    }
    let meta = SnapshotMeta { diff_id: Some(summary.diff_id), blobs: vec![blob.clone()], ..Default::default() };
    store.snapshots.commit(active, &id, &meta)?;
    Ok(id)
}

/// Record that `blob` is a compressed form of snapshot `id`, so exporting it
/// again needs no re-tarring.
fn remember_blob(store: &Store, id: &str, blob: &BlobRecord) -> anyhow::Result<()> {
    let mut meta = store.snapshots.meta(id).unwrap_or_default();
    if !meta.blobs.iter().any(|b| b.digest == blob.digest) {
        meta.blobs.push(blob.clone());
        store.snapshots.set_meta(id, &meta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_refuses_escapes() {
        assert_eq!(split_path(b"./a//b/./c/").unwrap(), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../b").is_err());
        assert!(split_path(b"..").is_err());
        assert!(split_path(b"./").unwrap().is_empty());
    }

    #[test]
    fn pax_times_parse() {
        let t = parse_pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.secs, t.nanos), (1_700_000_000, 500_000_000));
        assert!(parse_pax_time(b"x").is_none());
    }
}

//! Build contexts crossing the socket.
//!
//! kiln's client sends the build request with the context's file list, a
//! checksum per file ([`ContextEntry`]); if the daemon's content store
//! lacks some contents it answers with them ([`missing`]), the client
//! uploads only those, as a tar whose entries are named by their sha256,
//! and asks again; the daemon lays the context out from its store
//! ([`materialize`]). An unchanged context thus costs one request and no
//! file bytes.
//!
//! The Docker API sends the whole context as one tar ([`unpack_tar`]).
//! Every path from outside is checked: absolute paths, `..` and writes
//! through symlinks are refused with a 400 naming the entry.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use kiln_cache::Store;
use serde::{Deserialize, Serialize};

use super::web::ApiError;

/// What a context entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file (its content is the blob `digest`).
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `target`.
    Symlink,
}

/// One file, directory or symlink of a build context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextEntry {
    /// Relative `/`-separated path, no `.` or `..` components.
    pub path: String,
    /// File, dir or symlink.
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// `sha256:<hex>` of a file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The identity of a context list: sha256 (hex) over each entry's path,
/// kind, mode, digest and target. Client and daemon compute it alike, so
/// an unchanged context can be named by it alone
/// ([`super::build::BuildOptions::context_key`]).
pub fn list_key(entries: &[ContextEntry]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for e in entries {
        let kind = match e.kind {
            EntryKind::File => "f",
            EntryKind::Dir => "d",
            EntryKind::Symlink => "l",
        };
        // NUL cannot occur in a path, digest or link target: unambiguous.
        h.update(format!("{}\0{kind}\0{:o}\0{}\0{}\n", e.path, e.mode, e.digest.as_deref().unwrap_or(""), e.target.as_deref().unwrap_or("")));
    }
    hex::encode(h.finalize())
}

/// Check that `path` is relative and stays inside the context; returns it
/// as a relative `PathBuf`.
pub fn safe_relative(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() || path.contains('\0') {
        return Err(format!("path {path:?} is empty or contains NUL"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("path {path:?} escapes the context (..)")),
            Component::RootDir | Component::Prefix(_) => return Err(format!("path {path:?} is absolute")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("path {path:?} names the context root"));
    }
    Ok(out)
}

/// Whether `digest` is `sha256:` + 64 lowercase hex digits.
pub fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Validate a whole list: safe unique paths, digests on files, targets on symlinks.
pub fn validate(entries: &[ContextEntry]) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let place = format!("context entry {i} ({:?})", e.path);
        safe_relative(&e.path).map_err(|m| ApiError::bad_request(format!("{place}: {m}")))?;
        if !seen.insert(e.path.as_str()) {
            return Err(ApiError::bad_request(format!("{place}: listed twice")));
        }
        if e.mode > 0o7777 {
            return Err(ApiError::bad_request(format!("{place}: mode {:o} out of range", e.mode)));
        }
        match e.kind {
            EntryKind::File if !e.digest.as_deref().is_some_and(valid_digest) => {
                return Err(ApiError::bad_request(format!("{place}: a file needs a sha256:<64 hex> digest")));
            }
            EntryKind::Symlink if e.target.as_deref().is_none_or(|t| t.is_empty() || t.contains('\0')) => {
                return Err(ApiError::bad_request(format!("{place}: a symlink needs a target")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The file digests of `entries` the store does not have.
pub fn missing(store: &Store, digests: &[String]) -> Result<Vec<String>, ApiError> {
    let mut out = BTreeSet::new();
    for d in digests {
        if !valid_digest(d) {
            return Err(ApiError::bad_request(format!("digest {d:?}: expected sha256:<64 hex>")));
        }
        if !store.content.exists(d) {
            out.insert(d.clone());
        }
    }
    Ok(out.into_iter().collect())
}

/// Store the files of an upload tar (entries named by their sha256 hex);
/// each is verified against its name. Returns how many were stored.
pub fn store_blobs(store: &Store, tar: impl Read) -> Result<usize, ApiError> {
    let mut archive = tar::Archive::new(tar);
    let mut count = 0;
    let entries = archive.entries().map_err(|e| ApiError::bad_request(format!("upload: not a tar stream: {e}")))?;
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| ApiError::bad_request(format!("upload: tar entry {i}: {e}")))?;
        let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let digest = format!("sha256:{name}");
        if !valid_digest(&digest) || !entry.header().entry_type().is_file() {
            return Err(ApiError::bad_request(format!("upload: tar entry {i} ({name:?}) must be a file named by its sha256 hex")));
        }
        store
            .content
            .put_reader(&mut entry, Some(&digest), None)
            .map_err(|e| ApiError::bad_request(format!("upload: tar entry {i} ({name}): {e}")))?;
        count += 1;
    }
    Ok(count)
}

/// Lay out the context `entries` under `dest` from the content store.
pub fn materialize(store: &Store, entries: &[ContextEntry], dest: &Path) -> Result<(), ApiError> {
    validate(entries)?;
    // Parents first, whatever order the list came in.
    let mut sorted: Vec<&ContextEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let internal = |e: anyhow::Error| ApiError::new(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
    for e in sorted {
        let rel = safe_relative(&e.path).map_err(ApiError::bad_request)?;
        let path = dest.join(&rel);
        ensure_parents_inside(dest, &rel).map_err(|m| ApiError::bad_request(format!("context entry {:?}: {m}", e.path)))?;
        match e.kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display())).map_err(internal)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode)).map_err(|e| internal(e.into()))?;
            }
            EntryKind::Symlink => {
                std::os::unix::fs::symlink(e.target.as_deref().unwrap_or_default(), &path)
                    .with_context(|| format!("symlink {}", path.display()))
                    .map_err(internal)?;
            }
            EntryKind::File => {
                let digest = e.digest.as_deref().unwrap_or_default();
                let mut blob = store.content.open_blob(digest).map_err(|_| {
                    ApiError::bad_request(format!("context entry {:?}: content {digest} was never uploaded", e.path))
                })?;
                let mut out = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display())).map_err(internal)?;
                std::io::copy(&mut blob, &mut out).map_err(|e| internal(e.into()))?;
                out.set_permissions(std::fs::Permissions::from_mode(e.mode)).map_err(|e| internal(e.into()))?;
            }
        }
    }
    Ok(())
}

/// Every parent of `rel` under `dest` must be a real directory (or not
/// exist yet, then it is created): never a symlink that leads elsewhere.
fn ensure_parents_inside(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut here = dest.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        here.push(c);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory (a symlink or file cannot be a parent)", here.display())),
            Err(_) => std::fs::create_dir(&here).map_err(|e| format!("creating {}: {e}", here.display()))?,
        }
    }
    if std::fs::symlink_metadata(dest.join(rel)).is_ok() {
        return Err("already exists".to_string());
    }
    Ok(())
}

/// Unpack a Docker build-context tar (plain or gzip) into `dest`, refusing
/// entries that would land outside it.
pub fn unpack_tar(bytes: &[u8], dest: &Path) -> Result<(), ApiError> {
    let reader: Box<dyn Read + '_> = if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    let entries = archive.entries().map_err(|e| ApiError::bad_request(format!("build context: not a tar stream: {e}")))?;
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| ApiError::bad_request(format!("build context: tar entry {i}: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if raw == "./" || raw == "." {
            continue;
        }
        let rel = safe_relative(&raw).map_err(|m| ApiError::bad_request(format!("build context: tar entry {i}: {m}")))?;
        if kind.is_hard_link() {
            let target = entry.link_name().ok().flatten().map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
            safe_relative(&target).map_err(|m| ApiError::bad_request(format!("build context: tar entry {i} ({raw}): hard link {m}")))?;
        }
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if !parent.as_os_str().is_empty() {
            // Create parents ourselves so that none of them can be a symlink.
            let mut here = dest.to_path_buf();
            for c in parent.components() {
                here.push(c);
                match std::fs::symlink_metadata(&here) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(ApiError::bad_request(format!(
                            "build context: tar entry {i} ({raw}): parent {} is not a directory",
                            here.display()
                        )));
                    }
                    Err(_) => std::fs::create_dir(&here)
                        .map_err(|e| ApiError::bad_request(format!("build context: tar entry {i} ({raw}): {e}")))?,
                }
            }
        }
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| ApiError::bad_request(format!("build context: tar entry {i} ({raw}): {e}")))?;
        if !unpacked {
            return Err(ApiError::bad_request(format!("build context: tar entry {i} ({raw}) escapes the context")));
        }
    }
    Ok(())
}

/// Client side: list `dir` (minus what `ignore` excludes; the Dockerfile and
/// `.dockerignore` are always kept) with a digest per file. Files are hashed
/// in parallel, and a digest already known for an unchanged file (same
/// inode, size, mtime, ctime; kept in `checksum_file` across builds, as
/// embedded builds keep theirs) is not recomputed.
pub fn scan(
    dir: &Path,
    ignore: Option<&kiln_frontend::dockerignore::Matcher>,
    keep: &[String],
    checksum_file: PathBuf,
) -> anyhow::Result<Vec<ContextEntry>> {
    use rayon::prelude::*;
    let checksums = kiln_solver::tree::LocalContext::open("context", dir, &[], checksum_file)?;
    let mut out = Vec::new();
    let mut files = Vec::new();
    walk(dir, dir, ignore, keep, &mut out, &mut files)?;
    let digests: Vec<(usize, String)> = files
        .par_iter()
        .map(|(index, host, meta)| {
            let sha = checksums
                .file_sha256(&out[*index].path, host, meta)
                .with_context(|| format!("reading {}", host.display()))?;
            Ok((*index, format!("sha256:{sha}")))
        })
        .collect::<anyhow::Result<_>>()?;
    for (index, digest) in digests {
        out[index].digest = Some(digest);
    }
    // A cache that cannot be written only costs hashing next time.
    if let Err(e) = checksums.save_checksums() {
        tracing::debug!("saving context checksums: {e:#}");
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Where the client keeps the checksums of context `dir` between builds:
/// `$XDG_CACHE_HOME/kiln/contexts/` (else `~/.cache/...`, else the temp
/// dir), one file per context directory.
pub fn client_checksum_file(dir: &Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = hex::encode(&sha2::Sha256::digest(canonical.as_os_str().as_bytes())[..12]);
    let contexts = base.join("kiln").join("contexts");
    let file = contexts.join(format!("{name}.json"));
    // Only a new context adds a file: only then can there be too many.
    if !file.exists() {
        let _ = std::fs::create_dir_all(&contexts);
        forget_old_contexts(&contexts, 256);
    }
    file
}

/// Keep the checksum files of the `keep` contexts built most recently
/// (one-off contexts, like temp dirs, must not pile up).
fn forget_old_contexts(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.metadata().ok()?.modified().ok()?, e.path()))
        })
        .collect();
    if files.len() <= keep {
        return;
    }
    files.sort();
    for (_, path) in &files[..files.len() - keep] {
        let _ = std::fs::remove_file(path);
    }
}

/// Files to hash: (index in the entry list, host path, metadata).
type FilesToHash = Vec<(usize, PathBuf, std::fs::Metadata)>;

fn walk(
    base: &Path,
    dir: &Path,
    ignore: Option<&kiln_frontend::dockerignore::Matcher>,
    keep: &[String],
    out: &mut Vec<ContextEntry>,
    files: &mut FilesToHash,
) -> anyhow::Result<()> {
    for item in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let item = item?;
        let path = item.path();
        let rel = path.strip_prefix(base)?.to_string_lossy().into_owned();
        // Relative to the open directory (fstatat): no path walk per file.
        let meta = item.metadata().with_context(|| format!("reading {}", path.display()))?;
        let ignored = ignore.is_some_and(|m| m.matches(&rel)) && !keep.contains(&rel);
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            // An ignored directory may still hold re-included files: walk it,
            // but list it only if something inside is kept.
            let before = out.len();
            walk(base, &path, ignore, keep, out, files)?;
            if !ignored || out.len() > before {
                out.push(ContextEntry { path: rel, kind: EntryKind::Dir, mode, digest: None, target: None });
            }
            continue;
        }
        if ignored {
            continue;
        }
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?.to_string_lossy().into_owned();
            out.push(ContextEntry { path: rel, kind: EntryKind::Symlink, mode: 0o777, digest: None, target: Some(target) });
        } else if meta.is_file() {
            files.push((out.len(), path, meta));
            out.push(ContextEntry { path: rel, kind: EntryKind::File, mode, digest: None, target: None });
        }
        // Sockets, fifos and devices are not part of a build context.
    }
    Ok(())
}

/// Client side: a tar of the files of `entries` whose digest is in `wanted`,
/// each named by its sha256 hex.
pub fn blobs_tar(dir: &Path, entries: &[ContextEntry], wanted: &HashSet<String>) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut done = HashSet::new();
    for e in entries {
        let Some(digest) = &e.digest else { continue };
        if !wanted.contains(digest) || !done.insert(digest.clone()) {
            continue;
        }
        let path = dir.join(&e.path);
        let mut file = std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(file.metadata()?.len());
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, digest.trim_start_matches("sha256:"), &mut file)?;
    }
    Ok(builder.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's scan takes an unchanged file's digest from its
    /// checksum file (the stored value is returned, not recomputed) and
    /// hashes again once the file changed.
    #[test]
    fn scan_reuses_known_checksums_of_unchanged_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(ctx.join("sub")).unwrap();
        std::fs::write(ctx.join("sub/a.txt"), "hello\n").unwrap();
        std::fs::write(ctx.join("b.txt"), "other\n").unwrap();
        let cache = tmp.path().join("checksums.json");
        let digest_of = |entries: &[ContextEntry], path: &str| {
            entries.iter().find(|e| e.path == path).and_then(|e| e.digest.clone()).unwrap()
        };
        let first = scan(&ctx, None, &[], cache.clone()).unwrap();
        let real = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        assert_eq!(digest_of(&first, "sub/a.txt"), real);
        // Plant a different value for the unchanged file: a scan that
        // reads the file could not return it.
        let planted = "0".repeat(64);
        let text = std::fs::read_to_string(&cache).unwrap();
        let real_hex = real.trim_start_matches("sha256:");
        assert!(text.contains(real_hex), "{text}");
        std::fs::write(&cache, text.replace(real_hex, &planted)).unwrap();
        let second = scan(&ctx, None, &[], cache.clone()).unwrap();
        assert_eq!(digest_of(&second, "sub/a.txt"), format!("sha256:{planted}"));
        // Changed (size and ctime move): hashed again.
        std::fs::write(ctx.join("sub/a.txt"), "hello again\n").unwrap();
        let third = scan(&ctx, None, &[], cache).unwrap();
        assert_ne!(digest_of(&third, "sub/a.txt"), format!("sha256:{planted}"));
        assert_ne!(digest_of(&third, "sub/a.txt"), real);
        assert_eq!(digest_of(&third, "b.txt"), digest_of(&first, "b.txt"));
    }

    #[test]
    fn only_the_newest_context_checksum_files_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            let f = tmp.path().join(format!("{i}.json"));
            std::fs::write(&f, "{}").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i);
            std::fs::File::options().write(true).open(&f).unwrap().set_modified(t).unwrap();
        }
        forget_old_contexts(tmp.path(), 3);
        let mut left: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["2.json", "3.json", "4.json"]);
    }

    /// The key covers every field of every entry (a change anywhere is
    /// another context) and is pinned: clients and daemons of different
    /// builds must agree on it.
    #[test]
    fn list_key_covers_every_field() {
        let file = |path: &str, mode: u32, digest: &str| ContextEntry {
            path: path.into(),
            kind: EntryKind::File,
            mode,
            digest: Some(digest.into()),
            target: None,
        };
        let list = vec![file("a", 0o644, "sha256:aa"), ContextEntry { path: "l".into(), kind: EntryKind::Symlink, mode: 0o777, digest: None, target: Some("a".into()) }];
        let key = list_key(&list);
        assert_eq!(key, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"a\0f\0644\0sha256:aa\0\nl\0l\0777\0\0a\n")));
        let mut other = list.clone();
        other[0].mode = 0o755;
        assert_ne!(list_key(&other), key);
        let mut other = list.clone();
        other[0].digest = Some("sha256:ab".into());
        assert_ne!(list_key(&other), key);
        let mut other = list.clone();
        other[1].target = Some("b".into());
        assert_ne!(list_key(&other), key);
        assert_ne!(list_key(&list[..1]), key);
    }

    #[test]
    fn relative_paths() {
        assert_eq!(safe_relative("a/./b").unwrap(), PathBuf::from("a/b"));
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
        assert!(safe_relative(".").is_err());
    }
}

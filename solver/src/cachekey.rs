//! Cache keys, computed in two phases as BuildKit's `CacheMap`.
//!
//! 1. The *definition key* of an op: sha256 over its canonical definition
//!    digest ([`kiln_frontend::Op::definition_digest`]) and its inputs' keys,
//!    in order. A build context's own key is only its definition (name and
//!    ignore patterns), never its content.
//! 2. Ops that read files from a build context (COPY/ADD sources, bind
//!    mounts) add the *content checksum of exactly the files they read*:
//!    relative path, file type, mode bits (left out when `--chmod`
//!    overrides them), symlink target and content sha256. Never times, and
//!    never the host owner (context files are copied as root, or as
//!    `--chown` says, and the owner is part of the definition).
//!
//! File contents are hashed in parallel (rayon) through the context's
//! persistent checksum cache, so an unchanged file is never read again.
//! Secrets never enter a key: ops carry only their ids.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_cache::layered::Entry;
use kiln_frontend::graph::CopyAction;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::pattern::{self, Matcher};
use crate::tree::SourceTree;

fn digest_parts(tag: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    for p in parts {
        // Length-prefixed so no two part lists collide.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Phase 1: the key of an op from its definition digest and its inputs'
/// keys (in input order).
pub fn definition_key(definition_digest: &str, input_keys: &[String]) -> String {
    let mut parts = vec![definition_digest];
    parts.extend(input_keys.iter().map(String::as_str));
    digest_parts("kiln.op.v1", &parts)
}

/// Phase 2: fold content checksums of the files an op reads into its
/// definition key. With no checksums the definition key is the key.
pub fn content_key(definition_key: &str, checksums: &[String]) -> String {
    if checksums.is_empty() {
        return definition_key.to_string();
    }
    let mut parts = vec![definition_key];
    parts.extend(checksums.iter().map(String::as_str));
    digest_parts("kiln.content.v1", &parts)
}

/// Key of an image source: pinned to the resolved manifest digest, so a
/// moved tag is a new key.
pub fn image_key(definition_digest: &str, manifest_digest: &str) -> String {
    digest_parts("kiln.image.v1", &[definition_digest, manifest_digest])
}

/// One file read by an op, as it enters a checksum.
struct Item {
    rel: String,
    kind: char,
    mode: Option<u32>,
    link: String,
    file: Option<(PathBuf, std::fs::Metadata)>,
}

/// Content checksum of the files one COPY/ADD reads from a build context.
pub fn copy_checksum(tree: &SourceTree, action: &CopyAction) -> anyhow::Result<String> {
    // Everything of the action the checksum depends on.
    let what = format!("copy\0{:?}\0{:?}\0{}\0{}", action.sources, action.exclude, action.follow_symlinks, action.mode.is_none());
    remembered(tree, &what, || copy_checksum_now(tree, action))
}

/// A context's checksum of `what`: remembered across builds when its
/// content is verified (see [`crate::tree::VerifiedContent`]).
fn remembered(tree: &SourceTree, what: &str, compute: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<String> {
    match tree {
        SourceTree::Context(ctx) => ctx.remembered(what, compute),
        SourceTree::Layers(_) => compute(),
    }
}

fn copy_checksum_now(tree: &SourceTree, action: &CopyAction) -> anyhow::Result<String> {
    let excludes = Matcher::new(&action.exclude)?;
    let mut items = Vec::new();
    for source in &action.sources {
        // An unmatched source is an error of the copy itself, reported when
        // it runs; here it just contributes nothing.
        for matched in tree.expand(source)? {
            let root = tree.resolve(&matched, action.follow_symlinks)?;
            collect(tree, &root, &excludes, action.mode.is_none(), &mut items)?;
        }
    }
    finish(tree, &format!("copy {:?}", action.sources), items)
}

/// Content checksum of everything under `path` of a build context (a bind
/// mount's source).
pub fn subtree_checksum(tree: &SourceTree, path: &str) -> anyhow::Result<String> {
    remembered(tree, &format!("subtree\0{path}"), || {
        let root = tree.resolve(Path::new(&pattern::clean(path)), true)?;
        let mut items = Vec::new();
        collect(tree, &root, &Matcher::default(), true, &mut items)?;
        finish(tree, path, items)
    })
}

/// A path still to walk: relative path, what is there, and the path
/// relative to the COPY source (what `--exclude` patterns match).
type Pending = (PathBuf, Entry, PathBuf);

/// Walk `root` (resolved, relative) and everything below it, in pre-order
/// with names sorted. The subtrees of `root`'s children are walked in
/// parallel (rayon): an unchanged big context is one `lstat` per file, and
/// those are what an unchanged rebuild waits for.
fn collect(tree: &SourceTree, root: &Path, excludes: &Matcher, with_mode: bool, items: &mut Vec<Item>) -> anyhow::Result<()> {
    let Some(entry) = tree.lookup(root)? else { return Ok(()) };
    let is_dir = entry.metadata.is_dir();
    let top = (root.to_path_buf(), entry, PathBuf::new());
    let children = if is_dir { children(tree, &top, excludes)? } else { Vec::new() };
    items.push(item(top, with_mode)?);
    let subtrees: Vec<Vec<Item>> = children
        .into_par_iter()
        .map(|child| walk(tree, child, excludes, with_mode))
        .collect::<anyhow::Result<_>>()?;
    items.extend(subtrees.into_iter().flatten());
    Ok(())
}

/// Everything at and below `start`, in pre-order with names sorted.
fn walk(tree: &SourceTree, start: Pending, excludes: &Matcher, with_mode: bool) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut stack = vec![start];
    while let Some(next) = stack.pop() {
        if next.1.metadata.is_dir() {
            // Pushed reversed, so they are popped in name order.
            stack.extend(children(tree, &next, excludes)?.into_iter().rev());
        }
        items.push(item(next, with_mode)?);
    }
    Ok(items)
}

/// The visible, not excluded entries of directory `dir`, sorted.
fn children(tree: &SourceTree, dir: &Pending, excludes: &Matcher) -> anyhow::Result<Vec<Pending>> {
    let (rel, _, within) = dir;
    let mut out = Vec::new();
    for (name, entry) in tree.read_dir_entries(rel)? {
        let child_within = within.join(&name);
        if !excludes.is_empty() && excludes.excluded(&child_within.to_string_lossy()) {
            continue;
        }
        out.push((rel.join(&name), entry, child_within));
    }
    Ok(out)
}

/// What one walked path contributes to a checksum.
fn item((rel, entry, _): Pending, with_mode: bool) -> anyhow::Result<Item> {
    let meta = &entry.metadata;
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else {
        'o'
    };
    let link = if ft.is_symlink() {
        std::fs::read_link(&entry.host_path)?.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    Ok(Item {
        rel: rel.to_string_lossy().into_owned(),
        kind,
        mode: with_mode.then(|| meta.permissions().mode() & 0o7777),
        link,
        file: ft.is_file().then(|| (entry.host_path, entry.metadata.clone())),
    })
}

fn finish(tree: &SourceTree, what: &str, items: Vec<Item>) -> anyhow::Result<String> {
    let shas: Vec<String> = items
        .par_iter()
        .map(|item| match (&item.file, tree) {
            (Some((host, meta)), SourceTree::Context(ctx)) => ctx.file_sha256(&item.rel, host, meta),
            (Some((host, _)), SourceTree::Layers(_)) => crate::tree::sha256_file(host),
            (None, _) => Ok(String::new()),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("hashing files of {what}: {e}"))?;
    let mut h = Sha256::new();
    // One buffer for every line: a big context has tens of thousands.
    let mut line = String::new();
    for (item, sha) in items.iter().zip(&shas) {
        use std::fmt::Write;
        line.clear();
        let _ = write!(line, "{}\0{}\0", item.rel, item.kind);
        if let Some(m) = item.mode {
            let _ = write!(line, "{m:o}");
        }
        let _ = write!(line, "\0{}\0{}\n", item.link, sha);
        h.update(line.as_bytes());
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::LocalContext;
    use std::os::unix::fs::PermissionsExt;

    /// The checksum of a fixed context is pinned: a change to how files
    /// are walked or hashed must not silently change every cache key
    /// (an unchanged rebuild would then miss the cache once).
    #[test]
    fn a_copy_checksum_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("d/e")).unwrap();
        for (path, body, mode) in [("a", "x", 0o644), ("d/b", "bb", 0o755), ("d/e/c", "", 0o600), ("z", "zz", 0o640)] {
            std::fs::write(ctx.join(path), body).unwrap();
            std::fs::set_permissions(ctx.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        for d in ["", "d", "d/e"] {
            std::fs::set_permissions(ctx.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::symlink("a", ctx.join("l")).unwrap();
        let context = LocalContext::open("context", &ctx, &[], dir.path().join("sums.json")).unwrap();
        let tree = SourceTree::Context(std::sync::Arc::new(context));
        let all = copy_checksum(&tree, &CopyAction::new(0, vec![".".into()], "/")).unwrap();
        assert_eq!(all, "sha256:e4b62e6d5022ef310fa2f1645f1645845870fa65686cdbc8ae68b1785baf0796");
        let mut chmod = CopyAction::new(0, vec!["d".into()], "/");
        chmod.mode = Some(0o700);
        assert_eq!(copy_checksum(&tree, &chmod).unwrap(), "sha256:02433efb41f309f5d5b68bc51f7c552cb1e3e4341a33fdbb664d4707bc36871c");
    }

    /// A verified context gives the checksum a checked one gives, takes
    /// file digests from its list (never reading the files) and remembers
    /// a checksum across contexts opened over the same content.
    #[test]
    fn a_verified_context_takes_digests_from_its_list_and_remembers_checksums() {
        use crate::tree::VerifiedContent;
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("d")).unwrap();
        std::fs::write(ctx.join("a"), "x").unwrap();
        std::fs::write(ctx.join("d/b"), "bb").unwrap();
        let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
        let checked = LocalContext::open("context", &ctx, &[], dir.path().join("sums.json")).unwrap();
        let checked = SourceTree::Context(std::sync::Arc::new(checked));
        let all = CopyAction::new(0, vec![".".into()], "/");
        let only_d = CopyAction::new(0, vec!["d".into()], "/");
        let verified = |content: &std::sync::Arc<VerifiedContent>| {
            SourceTree::Context(std::sync::Arc::new(LocalContext::from_verified("context", &ctx, &[], content.clone()).unwrap()))
        };
        let truthful = std::sync::Arc::new(VerifiedContent::new([("a".to_string(), sha("x")), ("d/b".to_string(), sha("bb"))]));
        assert_eq!(copy_checksum(&verified(&truthful), &all).unwrap(), copy_checksum(&checked, &all).unwrap());
        // A planted digest is what a verified context uses: the file is not read.
        let planted = std::sync::Arc::new(VerifiedContent::new([("a".to_string(), sha("x")), ("d/b".to_string(), sha("other"))]));
        let first = copy_checksum(&verified(&planted), &all).unwrap();
        assert_ne!(first, copy_checksum(&checked, &all).unwrap());
        // Remembered per action and ignore rules: a later context over the
        // same content does not walk again (a file added behind its back
        // is not seen), another action is computed afresh.
        std::fs::write(ctx.join("new"), "n").unwrap();
        assert_eq!(copy_checksum(&verified(&planted), &all).unwrap(), first);
        assert_ne!(copy_checksum(&verified(&planted), &only_d).unwrap(), first);
        let ignoring = LocalContext::from_verified("context", &ctx, &["a".to_string()], planted.clone()).unwrap();
        assert_ne!(copy_checksum(&SourceTree::Context(std::sync::Arc::new(ignoring)), &all).unwrap(), first);
        assert_ne!(copy_checksum(&verified(&truthful), &all).unwrap(), copy_checksum(&checked, &all).unwrap());
    }
}

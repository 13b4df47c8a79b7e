//! What an op reads files from: a build context (a host directory seen
//! through its `.dockerignore`) or a chain of layers (seen merged).
//!
//! Both are a [`SourceTree`]; COPY, bind mounts and cache-key checksums
//! read through it, so the ignore rules and the "never escape the root"
//! rules are applied in exactly one place.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_cache::layered::{Entry, LayeredView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pattern::{self, Matcher};

/// A build context: a host directory plus its ignore rules and a persistent
/// cache of file checksums.
#[derive(Debug)]
pub struct LocalContext {
    /// Context name (`context` for the main one).
    pub name: String,
    /// The host directory.
    pub dir: PathBuf,
    /// `.dockerignore` patterns.
    pub matcher: Matcher,
    checksums: ChecksumCache,
    /// The ignore patterns, as part of what a remembered checksum depends on.
    exclude: Vec<String>,
}

/// The content of a context directory known before any build reads it:
/// the sha256 of every file, given by whoever wrote the directory from
/// contents it verified itself, and the content checksums builds computed
/// over it so far. Only for a directory nobody changes while this lives
/// (the caller's guarantee): its files are then never stat'ed for
/// freshness, read or hashed, and a checksum computed once is reused by
/// every later build ([`LocalContext::from_verified`]).
#[derive(Debug, Default)]
pub struct VerifiedContent {
    /// sha256 (hex) by relative `/`-separated path.
    files: HashMap<String, String>,
    /// Content checksums by what was checksummed (see [`LocalContext::remembered`]).
    checksums: Mutex<HashMap<String, String>>,
}

impl VerifiedContent {
    /// The content of a directory holding `files`: (relative path, sha256
    /// hex) for every regular file.
    pub fn new(files: impl IntoIterator<Item = (String, String)>) -> VerifiedContent {
        VerifiedContent { files: files.into_iter().collect(), checksums: Mutex::default() }
    }
}

impl LocalContext {
    /// Open context `name` at `dir`; `checksum_file` persists file
    /// checksums across builds.
    pub fn open(name: &str, dir: &Path, exclude: &[String], checksum_file: PathBuf) -> anyhow::Result<LocalContext> {
        let dir = dir.canonicalize().map_err(|e| anyhow::anyhow!("build context {}: {e}", dir.display()))?;
        anyhow::ensure!(dir.is_dir(), "build context {} is not a directory", dir.display());
        Ok(LocalContext {
            name: name.to_string(),
            dir,
            matcher: Matcher::new(exclude)?,
            checksums: ChecksumCache::load(checksum_file),
            exclude: exclude.to_vec(),
        })
    }

    /// Open context `name` at `dir` whose content is `verified`: no
    /// checksum file is read or written, file digests come from `verified`
    /// (a file it does not list is hashed), and checksums are remembered in
    /// it across builds.
    pub fn from_verified(name: &str, dir: &Path, exclude: &[String], verified: std::sync::Arc<VerifiedContent>) -> anyhow::Result<LocalContext> {
        anyhow::ensure!(dir.is_dir(), "build context {} is not a directory", dir.display());
        Ok(LocalContext {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            matcher: Matcher::new(exclude)?,
            checksums: ChecksumCache::verified(verified),
            exclude: exclude.to_vec(),
        })
    }

    /// The checksum of `what` (a description of everything it depends on
    /// besides the context's content) from `compute`, or, for a verified
    /// context, as computed before: its content cannot have changed.
    pub(crate) fn remembered(&self, what: &str, compute: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<String> {
        let Some(verified) = &self.checksums.verified else { return compute() };
        let key = format!("{:?}\0{what}", self.exclude);
        if let Some(sum) = verified.checksums.lock().unwrap().get(&key) {
            return Ok(sum.clone());
        }
        let sum = compute()?;
        verified.checksums.lock().unwrap().insert(key, sum.clone());
        Ok(sum)
    }

    /// sha256 (hex) of the content of regular file `rel` at `host`: taken
    /// from the checksum cache when (inode, size, mtime, ctime) are unchanged.
    pub fn file_sha256(&self, rel: &str, host: &Path, meta: &std::fs::Metadata) -> io::Result<String> {
        self.checksums.file_sha256(rel, host, meta)
    }

    /// How many files were actually read for hashing so far.
    pub fn files_hashed(&self) -> usize {
        self.checksums.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Persist the checksum cache (if anything changed).
    pub fn save_checksums(&self) -> anyhow::Result<()> {
        self.checksums.save()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChecksumRecord {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

type ChecksumRecords = HashMap<String, ChecksumRecord>;

/// File checksums keyed by path and validated by (inode, size, mtime, ctime),
/// or known beforehand ([`VerifiedContent`]).
#[derive(Debug)]
struct ChecksumCache {
    /// Where the records persist; `None` for verified content.
    file: Option<PathBuf>,
    verified: Option<std::sync::Arc<VerifiedContent>>,
    /// The records, once [`Self::records`] has waited for `loading`.
    records: Mutex<Option<ChecksumRecords>>,
    /// Reading and parsing the file (megabytes for a big context) runs on
    /// its own thread while the context is walked.
    loading: Mutex<Option<std::thread::JoinHandle<ChecksumRecords>>>,
    dirty: std::sync::atomic::AtomicBool,
    reads: std::sync::atomic::AtomicUsize,
}

impl ChecksumCache {
    fn load(file: PathBuf) -> ChecksumCache {
        // A missing or corrupt cache only costs re-hashing.
        let read = |file: &Path| -> ChecksumRecords {
            std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
        };
        let (records, loading) = {
            let path = file.clone();
            match std::thread::Builder::new().name("kiln-checksums".into()).spawn(move || read(&path)) {
                Ok(handle) => (None, Some(handle)),
                Err(_) => (Some(read(&file)), None),
            }
        };
        ChecksumCache {
            file: Some(file),
            verified: None,
            records: Mutex::new(records),
            loading: Mutex::new(loading),
            dirty: Default::default(),
            reads: Default::default(),
        }
    }

    /// Digests taken from `verified`; nothing loaded or saved.
    fn verified(verified: std::sync::Arc<VerifiedContent>) -> ChecksumCache {
        ChecksumCache {
            file: None,
            verified: Some(verified),
            records: Mutex::new(Some(ChecksumRecords::new())),
            loading: Mutex::new(None),
            dirty: Default::default(),
            reads: Default::default(),
        }
    }

    /// The records, waiting for the load if it still runs.
    fn records(&self) -> std::sync::MutexGuard<'_, Option<ChecksumRecords>> {
        let mut records = self.records.lock().unwrap();
        if records.is_none() {
            let loaded = self.loading.lock().unwrap().take().and_then(|h| h.join().ok());
            *records = Some(loaded.unwrap_or_default());
        }
        records
    }

    fn file_sha256(&self, rel: &str, host: &Path, meta: &std::fs::Metadata) -> io::Result<String> {
        if let Some(sha) = self.verified.as_ref().and_then(|v| v.files.get(rel)) {
            return Ok(sha.clone());
        }
        let stamp = |sha256: String| ChecksumRecord {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            sha256,
        };
        let probe = stamp(String::new());
        if let Some(rec) = self.records().as_ref().and_then(|r| r.get(rel))
            && (rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns) == (probe.ino, probe.size, probe.mtime_ns, probe.ctime_ns)
        {
            return Ok(rec.sha256.clone());
        }
        let sha = sha256_file(host)?;
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.records().get_or_insert_default().insert(rel.to_string(), stamp(sha.clone()));
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(sha)
    }

    fn save(&self) -> anyhow::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(self.records().get_or_insert_default())?;
        kiln_cache::fsutil::write_atomic(file, &bytes)?;
        Ok(())
    }
}

/// sha256 (hex) of a file's content, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Where an op reads files from.
#[derive(Debug, Clone)]
pub enum SourceTree {
    /// A build context (files owned by root once copied, ignore rules apply).
    Context(std::sync::Arc<LocalContext>),
    /// A merged chain of layers.
    Layers(LayeredView),
}

impl SourceTree {
    fn view(&self) -> LayeredView {
        match self {
            SourceTree::Context(c) => LayeredView::plain(c.dir.clone()),
            SourceTree::Layers(v) => v.clone(),
        }
    }

    /// Whether this is a build context.
    pub fn is_context(&self) -> bool {
        matches!(self, SourceTree::Context(_))
    }

    fn excluded(&self, rel: &Path) -> bool {
        match self {
            SourceTree::Context(c) => {
                let rel = rel.to_string_lossy();
                !rel.is_empty() && c.matcher.excluded(&rel)
            }
            SourceTree::Layers(_) => false,
        }
    }

    /// Resolve `path` inside the tree (see [`LayeredView::resolve`]).
    pub fn resolve(&self, path: &Path, follow_final: bool) -> io::Result<PathBuf> {
        self.view().resolve(path, follow_final)
    }

    /// What is at resolved path `rel`; ignored files are not there.
    pub fn lookup(&self, rel: &Path) -> io::Result<Option<Entry>> {
        if self.excluded(rel) && !self.walk_into_excluded(rel)? {
            return Ok(None);
        }
        self.view().lookup(rel)
    }

    /// An ignored directory is still entered when an exception may
    /// re-include something below it.
    fn walk_into_excluded(&self, rel: &Path) -> io::Result<bool> {
        match self {
            SourceTree::Context(c) if c.matcher.may_reinclude_below(&rel.to_string_lossy()) => {
                Ok(self.view().lookup(rel)?.is_some_and(|e| e.metadata.is_dir()))
            }
            _ => Ok(false),
        }
    }

    /// Visible names in directory `rel`, sorted.
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<String>> {
        Ok(self.read_dir_entries(rel)?.into_iter().map(|(name, _)| name).collect())
    }

    /// Visible names in directory `rel`, sorted, each with what
    /// [`Self::lookup`] finds at it (one `lstat` per entry in all).
    pub fn read_dir_entries(&self, rel: &Path) -> io::Result<Vec<(String, Entry)>> {
        let mut out = Vec::new();
        for (name, entry) in self.view().read_dir_entries(rel)? {
            let name = name.to_string_lossy().into_owned();
            let child = rel.join(&name);
            if self.excluded(&child) && !self.walk_into_excluded(&child)? {
                continue;
            }
            out.push((name, entry));
        }
        Ok(out)
    }

    /// Paths (relative, literal) matching a COPY source `pattern`: `*`, `?`
    /// and `[...]` per component. The root is `""`.
    pub fn expand(&self, pattern: &str) -> anyhow::Result<Vec<PathBuf>> {
        let cleaned = pattern::clean(pattern);
        let mut candidates = vec![PathBuf::new()];
        for comp in cleaned.split('/').filter(|c| !c.is_empty()) {
            let mut next = Vec::new();
            for cand in &candidates {
                if pattern::has_meta(comp) {
                    let re = pattern::glob_to_regex(comp, false)
                        .map_err(|e| anyhow::anyhow!("invalid source pattern {pattern:?}: {e}"))?;
                    let dir = self.resolve(cand, true)?;
                    let Ok(names) = self.read_dir(&dir) else { continue };
                    next.extend(names.into_iter().filter(|n| re.is_match(n)).map(|n| cand.join(n)));
                } else {
                    next.push(cand.join(comp));
                }
            }
            candidates = next;
        }
        let mut out = Vec::new();
        for cand in candidates {
            let parent = cand.parent().map(|p| self.resolve(p, true)).transpose()?.unwrap_or_default();
            let literal = match cand.file_name() {
                Some(name) => parent.join(name),
                None => parent,
            };
            if self.lookup(&literal)?.is_some() {
                out.push(cand);
            }
        }
        Ok(out)
    }
}

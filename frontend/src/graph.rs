//! The build graph: a small, closed set of ops, as BuildKit's LLB.
//!
//! Lowering a Dockerfile produces a [`Definition`]: a list of [`OpNode`]s in
//! topological order (every input index is smaller than the node's own
//! index). Each node holds one [`Op`] and its inputs. Everything that must not
//! change an op's identity — its progress name, the Dockerfile range it came
//! from — lives in [`OpMeta`], outside the op. The solver derives cache keys
//! from the canonical JSON of [`Op`] (see [`Op::definition_digest`]) plus its
//! inputs' keys; `OpMeta` never enters a key.
//!
//! The set is closed on purpose: new Dockerfile features become fields of
//! these ops, not new variants.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::{History, ImageConfig};
use crate::parser::Span;

/// Index of a node inside [`Definition::ops`].
pub type OpIndex = usize;

/// A whole build graph plus the image description of its target stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    /// Nodes in topological order: inputs always come first.
    pub ops: Vec<OpNode>,
    /// The node whose result is the target stage's filesystem.
    pub target: OpIndex,
    /// The target stage's image config and history, as lowering computed it.
    /// `rootfs`/`diff_ids` are filled in by whoever exports the result.
    pub image: ImageSpec,
}

/// The image that the target stage describes (config minus layers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Docker-style runtime config (Env, Cmd, Entrypoint, ...).
    pub config: ImageConfig,
    /// History entries in order: the base image's, then one per instruction.
    /// Entries with `empty_layer == false` correspond one-to-one, in order,
    /// to the layers of the target result.
    pub history: Vec<History>,
    /// Platform the image is for.
    pub platform: Platform,
}

/// One op with its inputs and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpNode {
    /// What to do.
    pub op: Op,
    /// The nodes this op reads from. Ops refer to them by position in this
    /// list (e.g. [`Mount::input`], [`CopyAction::src_input`]).
    pub inputs: Vec<OpIndex>,
    /// Progress name, source range, cache flags: never part of the key.
    pub meta: OpMeta,
}

/// Metadata that travels beside an op but never changes its identity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpMeta {
    /// Progress name, e.g. `[build 2/4] RUN make`.
    pub description: String,
    /// Where in the Dockerfile this op came from.
    pub span: Option<Span>,
    /// Name of the stage (or `stage-N`) the op belongs to.
    pub stage: Option<String>,
    /// `--no-cache` (or `--no-cache-filter`) for this op: always execute.
    pub ignore_cache: bool,
}

/// The four kinds of op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A root filesystem from outside the graph. No inputs.
    Source(SourceOp),
    /// Run a process on input 0 (the rootfs) with extra mounts.
    Exec(ExecOp),
    /// Native file operations on input 0 (or on scratch if there is none).
    File(FileOp),
    /// Layer the inputs on top of each other, in order (`COPY --link`).
    Merge(MergeOp),
}

impl Op {
    /// Digest of the op's canonical JSON encoding: the definition part of
    /// its cache key (inputs' keys and content checksums are added by the
    /// solver).
    pub fn definition_digest(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("ops always serialize");
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
    }
}

/// Where a root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceOp {
    /// The empty filesystem.
    Scratch,
    /// A registry image, e.g. `docker.io/library/busybox:latest`.
    Image {
        /// Fully qualified reference (the frontend normalizes `busybox` to
        /// `docker.io/library/busybox:latest`).
        reference: String,
        /// Which platform to pick from an index.
        platform: Platform,
    },
    /// A local directory the client sends (the build context, or a named
    /// context). Only files that match `include` (all when empty) and not
    /// `exclude` (`.dockerignore` patterns) are visible.
    Local {
        /// `context` for the main build context.
        name: String,
        /// Patterns of files to send; empty means everything.
        include: Vec<String>,
        /// `.dockerignore` patterns (with `!` exceptions), in order.
        exclude: Vec<String>,
    },
    /// A file fetched over HTTP(S) (`ADD URL`).
    Http {
        /// The URL.
        url: String,
        /// `--checksum`, e.g. `sha256:...`.
        checksum: Option<String>,
        /// Name of the file in the result (defaults to the URL's last path
        /// component).
        filename: String,
        /// Mode of the file.
        mode: Option<u32>,
    },
    /// A git repository (`ADD git@...` / `https://...git`).
    Git {
        /// Remote URL.
        remote: String,
        /// Branch, tag or commit.
        reference: Option<String>,
        /// `--keep-git-dir`.
        keep_git_dir: bool,
    },
}

/// A `os/arch[/variant]` triple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8`, empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Default for Platform {
    fn default() -> Self {
        Platform { os: "linux".into(), architecture: "amd64".into(), variant: String::new() }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// Run a process in a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecOp {
    /// argv, already in final form (shell form is wrapped in the SHELL).
    pub args: Vec<String>,
    /// `KEY=VALUE` entries, in order.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// `user[:group]`, names or ids; empty means root.
    pub user: String,
    /// `RUN --network`.
    pub network: NetworkMode,
    /// `RUN --security=insecure`.
    pub insecure: bool,
    /// Mounts besides the rootfs (the rootfs is always input 0 at `/`, and
    /// its changes are the op's result).
    pub mounts: Vec<Mount>,
}

/// Network of a RUN step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Builder default (isolated namespace with host-style egress).
    #[default]
    Default,
    /// Only loopback.
    None,
    /// The host's network namespace.
    Host,
}

/// An extra mount of a RUN step (`RUN --mount=...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the container.
    pub target: String,
    /// What is mounted.
    pub kind: MountKind,
}

/// The `type=` of a `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A path of another op's result (index into [`OpNode::inputs`]) or of
    /// the context.
    Bind {
        /// Position in [`OpNode::inputs`].
        input: usize,
        /// Path inside that input.
        source: String,
        /// `rw` makes writes possible; they are discarded after the step.
        readwrite: bool,
    },
    /// A persistent cache directory kept across builds.
    Cache {
        /// `id=` (defaults to the target path).
        id: String,
        /// `sharing=`.
        sharing: CacheSharing,
        /// Optional input to seed the cache from (`from=`), with `source`.
        from: Option<(usize, String)>,
        /// `uid=`, `gid=`, `mode=` of the cache root.
        uid: u32,
        /// See `uid`.
        gid: u32,
        /// See `uid`.
        mode: u32,
        /// `ro`.
        readonly: bool,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// `size=` in bytes, 0 for the default.
        size: u64,
    },
    /// A secret file (or env var, when `env` is set). The secret's value
    /// never enters the graph: only its id.
    Secret {
        /// `id=`.
        id: String,
        /// `env=`: expose as this environment variable instead of a file.
        env: Option<String>,
        /// `required=true`.
        required: bool,
        /// `uid=`, `gid=`, `mode=` of the file.
        uid: u32,
        /// See `uid`.
        gid: u32,
        /// See `uid`.
        mode: u32,
    },
    /// An SSH agent socket (`type=ssh`).
    Ssh {
        /// `id=`.
        id: String,
        /// `required=true`.
        required: bool,
    },
}

/// `sharing=` of a cache mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSharing {
    /// Concurrent writers share the directory.
    #[default]
    Shared,
    /// Each concurrent writer gets its own copy.
    Private,
    /// Writers wait for each other.
    Locked,
}

/// A chain of native file actions applied on input 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileOp {
    /// Position in [`OpNode::inputs`] of the base filesystem, or `None` to
    /// start from scratch (e.g. `COPY --link` writes to a fresh layer).
    pub base: Option<usize>,
    /// Applied in order.
    pub actions: Vec<FileAction>,
}

/// One native file action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAction {
    /// COPY / ADD.
    Copy(CopyAction),
    /// Create a directory (WORKDIR, COPY destination parents).
    Mkdir {
        /// Absolute path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Create missing parents.
        make_parents: bool,
        /// Owner, if not root.
        owner: Option<Owner>,
    },
    /// Create a file with the given bytes (COPY of a heredoc).
    Mkfile {
        /// Absolute path.
        path: String,
        /// Content.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// Owner, if not root.
        owner: Option<Owner>,
    },
    /// Remove a path.
    Rm {
        /// Absolute path.
        path: String,
        /// Do not fail when missing.
        allow_not_found: bool,
    },
    /// Create a symlink.
    Symlink {
        /// Link target.
        target: String,
        /// Absolute path of the link.
        path: String,
    },
}

/// Owner given by `--chown` (names resolved against the base's
/// `/etc/passwd` and `/etc/group` at solve time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    /// User name or numeric id.
    pub user: String,
    /// Group name or numeric id; `None` means the user's primary group
    /// (or the same id when the user is numeric).
    pub group: Option<String>,
}

/// One COPY/ADD source set into one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyAction {
    /// Position in [`OpNode::inputs`] that the sources are read from.
    pub src_input: usize,
    /// Source paths or globs relative to that input's root.
    pub sources: Vec<String>,
    /// Destination (absolute, already joined with WORKDIR; a trailing `/`
    /// means "into this directory").
    pub dest: String,
    /// `--chown`.
    pub owner: Option<Owner>,
    /// `--chmod` (octal already parsed).
    pub mode: Option<u32>,
    /// `--parents`: keep the source's parent directories under `dest`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// ADD: extract local tar archives.
    pub extract_archives: bool,
    /// Follow a symlink named directly as a source (Docker does for COPY).
    pub follow_symlinks: bool,
    /// Create the destination's missing parents.
    pub create_dest_path: bool,
    /// Accept a glob that matches nothing (BuildKit's `AllowEmptyWildcard`).
    pub allow_empty_wildcard: bool,
}

impl CopyAction {
    /// A COPY of `sources` from input `src_input` to `dest` with Docker's
    /// defaults: no chown/chmod, symlinked sources followed, missing
    /// destination parents created, a glob matching nothing is an error.
    pub fn new(src_input: usize, sources: Vec<String>, dest: impl Into<String>) -> CopyAction {
        CopyAction {
            src_input,
            sources,
            dest: dest.into(),
            owner: None,
            mode: None,
            parents: false,
            exclude: vec![],
            extract_archives: false,
            follow_symlinks: true,
            create_dest_path: true,
            allow_empty_wildcard: false,
        }
    }
}

/// Put inputs on top of each other in order: the result's layers are the
/// first input's layers followed by each next input's layers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MergeOp {}

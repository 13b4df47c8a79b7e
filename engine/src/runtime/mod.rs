//! Containers on overlay rootfs, run with libcontainer.
//!
//! One [`ContainerSpec`] describes one process: its rootfs (layer
//! directories as overlay lowerdirs plus the upperdir/workdir that receive
//! its changes), argv/env/cwd/user, extra mounts, network mode, hostname
//! and limits. [`Runtime::start`] mounts the overlay (with a layer of the
//! standard mount points on top of the image's, see `mountpoints`, and
//! stubs in the upperdir for other mount targets the image lacks), writes
//! `/etc/hosts` and `/etc/resolv.conf`, builds the OCI spec and starts the
//! container; [`Running::wait`] reaps it and cleans everything up: the
//! mount-point stubs in the upperdir, so the upperdir is exactly the
//! process's diff, then its cgroup (if it has limits) and every mount
//! ([`Running::wait_reporting_exit`] tells the exit code in between).
//! [`Runtime::run`] does both.
//!
//! State lives under `<state root>/containers/<id>/`, guarded by an
//! `flock` held for the container's lifetime; [`Runtime::new`] sweeps the
//! state of every container whose owner died (e.g. `kill -9` of kiln).
//! [`Runtime::for_store`] puts a store's state root on a tmpfs.
//!
//! Network modes: `None` and `Default` both get a new network namespace with
//! only `lo` up — there is no egress yet (a builder usually wants it, but
//! this machine has no network to give); `Host` shares the host's.

mod cgroupless;
mod fsat;
mod mountpoints;
mod netns;
pub use netns::{NetnsPool, PooledNetns};
pub mod overlay;
mod spec;
mod stubs;
pub mod tty;
pub mod user;
mod workload;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use libcontainer::container::Container;
use libcontainer::notify_socket::NotifySocket;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

pub use kiln_frontend::graph::NetworkMode;
pub use kiln_solver::LogSink;
pub use kiln_solver::worker::LogStream;

use stubs::{StubKind, Stubs};

/// The rootfs of a container: read-only layers and where changes go.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Rootfs {
    /// Layer directories, bottom first (overlay format).
    pub lower: Vec<PathBuf>,
    /// Empty directory that receives the changes; empty path = a throw-away
    /// upper in the runtime's scratch directory (see [`Rootfs::throwaway`]).
    pub upper: PathBuf,
    /// Empty overlay work directory on the same filesystem as `upper`.
    pub work: PathBuf,
}

impl Rootfs {
    /// `lower` with changes discarded when the container is cleaned up
    /// (also by a sweep after a crash), as for `kiln run`.
    pub fn throwaway(lower: Vec<PathBuf>) -> Self {
        Rootfs {
            lower,
            upper: PathBuf::new(),
            work: PathBuf::new(),
        }
    }
}

/// An extra mount.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// Absolute path in the container.
    pub target: PathBuf,
    /// What is mounted.
    pub source: MountSource,
    /// Read-only.
    pub readonly: bool,
}

/// What a [`Mount`] mounts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum MountSource {
    /// A host file or directory.
    Bind(PathBuf),
    /// Layer directories (bottom first) as an overlay; if the mount is
    /// writable, writes go to a throw-away upper dir.
    Layers(Vec<PathBuf>),
    /// A fresh tmpfs of `size` bytes (0 = kernel default).
    Tmpfs {
        /// Size in bytes; 0 for the default.
        size: u64,
    },
}

/// cgroup limits.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit in CPUs (e.g. 0.5).
    pub cpus: Option<f64>,
}

impl Limits {
    /// No limit is set: the container then joins no cgroup of its own
    /// (see `cgroupless`).
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpus.is_none()
    }
}

/// Everything about one container.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    /// Container name; `None` picks a unique one. Letters, digits, `_.-`.
    pub name: Option<String>,
    /// The rootfs.
    pub rootfs: Rootfs,
    /// argv (argv\[0\] looked up in `PATH` inside the container).
    pub args: Vec<String>,
    /// `KEY=VALUE`; `PATH`, `HOME` and `HOSTNAME` are added when missing.
    pub env: Vec<String>,
    /// Absolute working directory, created if missing ("" = `/`).
    pub cwd: String,
    /// `name|uid[:group|gid]` resolved in the rootfs; "" = root.
    pub user: String,
    /// Extra mounts, in order.
    pub mounts: Vec<Mount>,
    /// Network mode.
    pub network: NetworkMode,
    /// Hostname ("" = the container name, cut to 12 characters).
    pub hostname: String,
    /// cgroup limits.
    pub limits: Limits,
}

impl ContainerSpec {
    /// A spec running `args` on `rootfs` as root in `/`, no network.
    pub fn new(rootfs: Rootfs, args: Vec<String>) -> Self {
        ContainerSpec {
            name: None,
            rootfs,
            args,
            env: Vec::new(),
            cwd: "/".into(),
            user: String::new(),
            mounts: Vec::new(),
            network: NetworkMode::None,
            hostname: String::new(),
            limits: Limits::default(),
        }
    }
}

/// Where the container's stdin comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// `/dev/null`.
    Null,
    /// kiln's own stdin (`kiln run -i`).
    Inherit,
}

/// Where the container's stdout and stderr go.
#[derive(Clone)]
pub enum Output {
    /// kiln's own stdout/stderr.
    Inherit,
    /// Chunks as they arrive, tagged with their stream.
    Stream(LogSink),
    /// A pseudo-terminal of this initial size, opened inside the
    /// container: its stdin, stdout and stderr are the slave; the master is
    /// [`Running::take_terminal`] (the [`Stdin`] setting is ignored).
    Terminal(tty::WindowSize),
}

/// The container's standard streams.
#[derive(Clone)]
pub struct Stdio {
    /// stdin.
    pub stdin: Stdin,
    /// stdout and stderr.
    pub output: Output,
}

impl Stdio {
    /// stdin from `/dev/null`, output to `sink`.
    pub fn stream(sink: LogSink) -> Self {
        Stdio {
            stdin: Stdin::Null,
            output: Output::Stream(sink),
        }
    }
}

/// Runs containers; owns the state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    state_root: PathBuf,
    /// Where the changes of containers with a throw-away rootfs go
    /// (`<scratch_root>/<id>/{upper,work}`): on disk, even when the state
    /// is on a tmpfs.
    scratch_root: PathBuf,
    /// Short hash of the state root: cgroups are `/kiln/<tag>-<id>`, so two
    /// store roots running containers of the same name never share one.
    cgroup_tag: String,
    /// `KILN_RUNTIME_TIMING=1`: print how long each phase took (to stderr).
    timing: bool,
    /// The network namespace containers join instead of making their own
    /// (see [`Runtime::joining_netns`]).
    netns: Option<PathBuf>,
}

impl Runtime {
    /// Use `state_root` for container state, and clean up whatever
    /// containers of dead kiln processes left there. Throw-away changes go
    /// to the scratch directory recorded there by [`Runtime::for_store`],
    /// else to `<state_root>/scratch`.
    pub fn new(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let rt = Runtime::open(state_root)?;
        rt.sweep()?;
        Ok(rt)
    }

    /// [`Runtime::new`] without the sweep: for a container shim, whose
    /// kiln process made (and swept) the runtime already.
    pub fn open(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let state_root: PathBuf = state_root.into();
        let containers = state_root.join("containers");
        std::fs::create_dir_all(&containers)
            .with_context(|| format!("creating {}", containers.display()))?;
        let canonical = std::fs::canonicalize(&state_root)
            .with_context(|| format!("resolving {}", state_root.display()))?;
        let scratch_root = match std::fs::read_to_string(canonical.join(SCRATCH_RECORD)) {
            Ok(path) => PathBuf::from(path),
            Err(_) => canonical.join("scratch"),
        };
        // The canonical path from here on: mounts are found under a
        // container's directory by their path in mountinfo, which the kernel
        // prints resolved (a root reached through a symlink would never match).
        let rt = Runtime {
            cgroup_tag: cgroup_tag(&canonical),
            state_root: canonical,
            scratch_root,
            timing: std::env::var_os("KILN_RUNTIME_TIMING").is_some(),
            netns: None,
        };
        std::fs::create_dir_all(rt.libcontainer_dir())
            .with_context(|| format!("creating {}", rt.libcontainer_dir().display()))?;
        Ok(rt)
    }

    /// The runtime of the kiln store at `store_root`. Its state goes on a
    /// tmpfs when there is one to use (`/run/kiln/<store hash>` where `/run`
    /// is a tmpfs, else `/dev/shm/kiln/<store hash>`), else to
    /// `<store_root>/run`; throw-away changes always go to
    /// `<store_root>/run/scratch`, on the store's disk.
    ///
    /// Why a tmpfs: every container creates and removes about a dozen small
    /// files and directories of state. On ext4, after many deletions, each
    /// new inode makes the allocator scan for recently deleted ones
    /// (`recently_deleted` in `perf`): 2-3 ms per build step. A tmpfs
    /// also matches the state's life: no container outlives a reboot.
    pub fn for_store(store_root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store_root)
            .with_context(|| format!("creating {}", store_root.display()))?;
        let store = std::fs::canonicalize(store_root)
            .with_context(|| format!("resolving {}", store_root.display()))?;
        let on_disk = store.join("run");
        let Some(state_root) = tmpfs_state_dir(&store) else {
            return Runtime::new(on_disk);
        };
        if !state_root.exists() {
            // A store's first container here: a good moment to drop the
            // state dirs of stores that were deleted since.
            if let Some(base) = state_root.parent() {
                forget_deleted_stores(base);
            }
        }
        std::fs::create_dir_all(&state_root)
            .with_context(|| format!("creating {}", state_root.display()))?;
        let scratch = on_disk.join("scratch");
        let record = state_root.join(SCRATCH_RECORD);
        if std::fs::read(&record).ok().as_deref() != Some(scratch.as_os_str().as_bytes()) {
            kiln_cache::fsutil::write_atomic(&record, scratch.as_os_str().as_bytes())
                .with_context(|| format!("writing {}", record.display()))?;
        }
        Runtime::new(state_root)
    }

    /// Where [`Runtime::for_store`] keeps the state of the (existing) store
    /// at `store_root`; creates and sweeps nothing.
    pub fn state_root_of_store(store_root: &Path) -> anyhow::Result<PathBuf> {
        let store = std::fs::canonicalize(store_root)
            .with_context(|| format!("resolving {}", store_root.display()))?;
        Ok(tmpfs_state_dir(&store).unwrap_or_else(|| store.join("run")))
    }

    /// Containers of this runtime without [`NetworkMode::Host`] join the
    /// network namespace at `path` (e.g. `/proc/<pid>/fd/<n>` of a
    /// [`NetnsPool`] lease, open until the container has exited) instead of
    /// each making a fresh loopback-only one; `None`: fresh ones.
    pub fn joining_netns(mut self, path: Option<PathBuf>) -> Self {
        self.netns = path;
        self
    }

    /// The runtime-wide lock between sweeping and creating containers.
    fn sweep_lock(&self, how: nix::fcntl::FlockArg) -> anyhow::Result<File> {
        let path = self.state_root.join("sweep.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        #[allow(deprecated)]
        nix::fcntl::flock(f.as_raw_fd(), how)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(f)
    }

    fn containers_dir(&self) -> PathBuf {
        self.state_root.join("containers")
    }

    fn libcontainer_dir(&self) -> PathBuf {
        self.state_root.join("libcontainer")
    }

    /// Clean up containers whose owning process is gone: kill them, delete
    /// their cgroup (and libcontainer state left by kiln versions that kept
    /// one), unmount, remove stubs and state.
    /// Returns how many were cleaned.
    pub fn sweep(&self) -> anyhow::Result<usize> {
        // Exclusive against container creation (which holds it shared from
        // mkdir until its own lock is taken), so a half-created container
        // is never mistaken for a dead one.
        let _guard = self.sweep_lock(nix::fcntl::FlockArg::LockExclusive)?;
        let mut cleaned = 0;
        for entry in std::fs::read_dir(self.containers_dir())? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            // The owner holds an exclusive flock on the lock file for the
            // container's lifetime; getting it means the owner is gone.
            let Ok(lock) = File::open(dir.join("lock")) else {
                // Its creator died between mkdir and taking the lock.
                self.cleanup_state(&id, None)?;
                cleaned += 1;
                continue;
            };
            if !try_lock(&lock) {
                // Held. Normally by a live owner; but when the owner was
                // killed while libcontainer was starting the container, its
                // cloned children (which inherited the locked fd) wait
                // forever for a "start" that never comes. Kill them.
                if owner_alive(&dir) || !self.kill_orphans(&id, &dir.join("lock"), &lock) {
                    continue;
                }
            }
            let stubs = read_stub_record(&dir);
            self.cleanup_state(&id, stubs.as_ref().map(|(u, s)| (u.as_path(), s)))?;
            cleaned += 1;
        }
        // Throw-away changes without state: the state was on a tmpfs that
        // a reboot emptied (or went with a crash between the two removals).
        if let Ok(entries) = std::fs::read_dir(&self.scratch_root) {
            for entry in entries {
                let entry = entry?;
                if !self.containers_dir().join(entry.file_name()).exists() {
                    self.remove_scratch(&entry.file_name().to_string_lossy())?;
                    cleaned += 1;
                }
            }
        }
        mountpoints::remove_stale_temporaries(&self.state_root);
        // libcontainer state: left by kiln versions that created containers
        // through libcontainer's builder (see `Running::create`).
        for entry in std::fs::read_dir(self.libcontainer_dir())? {
            let entry = entry?;
            if !self.containers_dir().join(entry.file_name()).exists() {
                delete_libcontainer(&entry.path());
                cleaned += 1;
            }
        }
        Ok(cleaned)
    }

    /// Kill the processes of container `id` whose owner is dead: those
    /// holding its lock file open and those in its cgroup. True once the
    /// lock could be taken (within two seconds).
    fn kill_orphans(&self, id: &str, lock_path: &Path, lock: &File) -> bool {
        let cgroup = self.cgroup_name(id);
        for _ in 0..20 {
            for pid in processes_holding(lock_path)
                .into_iter()
                .chain(processes_in_cgroup(&cgroup))
            {
                tracing::info!(pid, id, "killing an orphan of a dead kiln process");
                let _ =
                    nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            if try_lock(lock) {
                return true;
            }
        }
        false
    }

    /// The cgroup (relative to each hierarchy's root) of container `id`:
    /// `kiln/<hash of the state root>-<id>`.
    pub fn cgroup_name(&self, id: &str) -> String {
        format!("kiln/{}-{id}", self.cgroup_tag)
    }

    /// The state directory given to [`Runtime::new`], symlinks resolved.
    pub fn state_root(&self) -> &Path {
        &self.state_root
    }

    /// Start a container; its process is running when this returns.
    ///
    /// Only call this from a process with a single thread (see
    /// [`crate::executor::Shim`]): libcontainer's cloned child exits through
    /// `std::process::exit`, which takes std-internal locks another thread
    /// may hold at the moment of the clone, and then hangs forever.
    pub fn start(&self, spec: &ContainerSpec, stdio: Stdio) -> anyhow::Result<Running> {
        let id = match &spec.name {
            Some(name) => {
                validate_name(name)?;
                name.clone()
            }
            None => random_id(),
        };
        let dir = self.containers_dir().join(&id);
        let creating = self.sweep_lock(nix::fcntl::FlockArg::LockShared)?;
        std::fs::create_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!("container name {id:?} is already in use")
            } else {
                anyhow::Error::new(e).context(format!("creating {}", dir.display()))
            }
        })?;
        let lock = File::create(dir.join("lock"))
            .with_context(|| format!("creating {}/lock", dir.display()))?;
        #[allow(deprecated)]
        nix::fcntl::flock(lock.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive)
            .context("locking container state")?;
        // Before the sweep lock is released: a sweep never sees a locked
        // container without its owner record.
        std::fs::write(dir.join("owner"), owner_record())?;
        drop(creating);
        let mut running = Running {
            runtime: self.clone(),
            id,
            dir,
            upper: spec.rootfs.upper.clone(),
            stubs: Stubs::default(),
            throwaway_upper: false,
            pid: None,
            readers: Vec::new(),
            terminal: None,
            detacher: None,
            clock: Clock::new(self.timing),
            _lock: lock,
            cleaned: false,
        };
        // On error `running` drops here, which cleans up what was done.
        running.setup(spec, stdio)?;
        Ok(running)
    }

    /// Start a container and wait for it; returns its exit code (128+N if
    /// killed by signal N). Everything is cleaned up on every path.
    pub fn run(&self, spec: &ContainerSpec, stdio: Stdio) -> anyhow::Result<i32> {
        self.start(spec, stdio)?.wait()
    }

    /// Remove everything of container `id`; `stubs` = (upperdir, stubs) to
    /// take out of the upperdir after unmounting.
    fn cleanup_state(&self, id: &str, stubs: Option<(&Path, &Stubs)>) -> anyhow::Result<()> {
        let lc = self.libcontainer_dir().join(id);
        if lc.exists() {
            delete_libcontainer(&lc);
        }
        // libcontainer can leave the cgroup behind when creation fails, and
        // after a crash its killed processes may take a moment to be reaped
        // (by their new parent, not us): give them a second.
        // A cgroup whose last task was just reaped can still be busy for a
        // moment on a loaded host: short retries first.
        for attempt in 0..60 {
            if remove_cgroups(&self.cgroup_name(id)) {
                break;
            }
            let pause = if attempt < 10 { 2 } else { 20 };
            std::thread::sleep(std::time::Duration::from_millis(pause));
        }
        let dir = self.containers_dir().join(id);
        // Usually none: the host's copies were detached while it ran.
        let mounted = overlay::mounts_under(&dir)?;
        if !mounted.is_empty() {
            for m in &mounted {
                overlay::unmount(m)?;
            }
            let left = overlay::mounts_under(&dir)?;
            if !left.is_empty() {
                // Never recurse into a directory that still has a mount below it.
                bail!("container {id}: could not unmount {}", left[0].display());
            }
        }
        // After a crash the upperdir (an uncommitted snapshot under the
        // store's tmp/) may already be gone, removed by the store's own
        // cleanup: then there are no stubs left to remove.
        if let Some((upper, stubs)) = stubs
            && std::fs::symlink_metadata(upper).is_ok()
        {
            stubs
                .remove_from_upper(upper)
                .with_context(|| format!("container {id}: removing mount-point stubs"))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        self.remove_scratch(id)
    }

    /// Remove the throw-away changes of container `id`, if it had any.
    fn remove_scratch(&self, id: &str) -> anyhow::Result<()> {
        let scratch = self.scratch_root.join(id);
        match std::fs::remove_dir_all(&scratch) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", scratch.display()))
            }
            _ => Ok(()),
        }
    }
}

/// The mount points of the cgroup hierarchies (v1 controllers and/or v2),
/// read once per process: the teardown of every container needs them.
fn cgroup_mounts() -> &'static [PathBuf] {
    static MOUNTS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    MOUNTS.get_or_init(read_cgroup_mounts)
}

fn read_cgroup_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or("");
        let fields: Vec<&str> = left.split(' ').collect();
        if (fstype == "cgroup" || fstype == "cgroup2") && fields.len() >= 5 && fields[3] == "/" {
            out.push(PathBuf::from(fields[4]));
        }
    }
    out
}

/// Remove the (empty) cgroup directories `name` (e.g. `kiln/<tag>-<id>`)
/// in every cgroup hierarchy; false if one could not be removed.
fn remove_cgroups(name: &str) -> bool {
    let mut all_gone = true;
    for mount in cgroup_mounts() {
        match std::fs::remove_dir(mount.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => all_gone = false,
        }
    }
    all_gone
}

/// Pids in cgroup `name` in any hierarchy.
fn processes_in_cgroup(name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_mounts()
        .iter()
        .filter_map(|m| std::fs::read_to_string(m.join(name).join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Pids of the processes that have `path` open (found through /proc/*/fd).
fn processes_holding(path: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        });
        if holds {
            out.push(pid);
        }
    }
    out
}

/// Take an exclusive flock on `lock` without waiting; true if taken.
fn try_lock(lock: &File) -> bool {
    #[allow(deprecated)] // a plain fd lock; nix's Flock wrapper would own the File
    nix::fcntl::flock(
        lock.as_raw_fd(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .is_ok()
}

/// A process's start time (clock ticks after boot, field 22 of
/// `/proc/<pid>/stat`); `None` if it is gone or a zombie.
fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    // `rest` starts at field 3 (state), so field 22 is at index 19.
    fields.get(19)?.parse().ok()
}

/// The content of a container's `owner` file: this process's pid and start time.
fn owner_record() -> String {
    let pid = std::process::id() as i32;
    format!("{pid} {}", process_start_time(pid).unwrap_or(0))
}

/// Whether the process recorded in `<dir>/owner` still runs (the same
/// process: pid and start time match, so a recycled pid does not count).
fn owner_alive(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("owner")) else {
        // Written while the sweep lock is held, before it is released: a
        // locked container without one was made by an older kiln.
        return true;
    };
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<i32>().ok()),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    process_start_time(pid) == Some(start)
}

/// A short stable hash of a state directory path, for cgroup names.
/// The file in a state root naming its scratch directory.
const SCRATCH_RECORD: &str = "scratch-root";

/// Remove the tmpfs state dirs under `base` whose store (named by their
/// scratch record, `<store>/run/scratch`) no longer exists and that hold
/// no container. A store in use exists before its state dir is made, so
/// this never races with one.
fn forget_deleted_stores(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(scratch) = std::fs::read_to_string(dir.join(SCRATCH_RECORD)) else {
            continue;
        };
        let store_gone = Path::new(&scratch)
            .ancestors()
            .nth(2)
            .is_some_and(|store| !store.exists());
        let idle = std::fs::read_dir(dir.join("containers")).map_or(true, |mut d| d.next().is_none());
        if store_gone && idle {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A state directory for the store at `store` (canonical) on a tmpfs, if
/// there is one this process may use: a directory of its own, which no
/// other user can write to (`/dev/shm` is world-writable).
fn tmpfs_state_dir(store: &Path) -> Option<PathBuf> {
    tmpfs_state_dir_in(
        store,
        &[
            (Path::new("/run"), Path::new("/run/kiln")),
            (Path::new("/dev/shm"), Path::new("/dev/shm/kiln")),
        ],
    )
}

/// [`tmpfs_state_dir`] with the candidate `(tmpfs mount, base dir)` pairs.
fn tmpfs_state_dir_in(store: &Path, candidates: &[(&Path, &Path)]) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let name = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(store.as_os_str().as_bytes())[..8])
    };
    for &(mount, base) in candidates {
        let on_tmpfs = nix::sys::statfs::statfs(mount)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if !on_tmpfs {
            continue;
        }
        let _ = std::fs::DirBuilder::new().mode(0o700).create(base);
        let ours = std::fs::symlink_metadata(base).is_ok_and(|m| {
            m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o022 == 0
        });
        if ours {
            return Some(base.join(name));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tmpfs_state_dir_only_in_a_private_dir_of_our_own() {
        // /dev/shm is a tmpfs on Linux; without one there is nothing to test.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else { return };
        let tmpfs = shm.path();
        let store = Path::new("/some/store");
        let pick = |base: &Path| tmpfs_state_dir_in(store, &[(tmpfs, base)]);

        let fresh = tmpfs.join("fresh");
        let got = pick(&fresh).expect("a fresh base dir is made and used");
        assert!(got.starts_with(&fresh));
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(pick(&fresh), Some(got), "the same store, the same dir");

        let open = tmpfs.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(pick(&open), None, "a world-writable base is refused");

        let link = tmpfs.join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert_eq!(pick(&link), None, "a symlinked base is refused");

        // Not a tmpfs: the store's disk instead.
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let on_disk = disk.path().join("kiln");
        assert_eq!(tmpfs_state_dir_in(store, &[(disk.path(), &on_disk)]), None);
    }
}

fn cgroup_tag(state_root: &Path) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(state_root.as_os_str().as_bytes());
    hex::encode(&digest[..4])
}

/// Kill and delete a libcontainer container (state dir and cgroup); if its
/// state cannot be loaded, at least remove the directory.
fn delete_libcontainer(lc: &Path) {
    match Container::load(lc.to_path_buf()) {
        Ok(mut c) => {
            if let Err(e) = c.delete(true) {
                tracing::warn!("deleting container state {}: {e}", lc.display());
            }
        }
        Err(e) => tracing::warn!("loading container state {}: {e}", lc.display()),
    }
    if lc.exists() {
        let _ = std::fs::remove_dir_all(lc);
    }
}

/// A started container. Dropping it without [`Running::wait`] kills the
/// container and cleans up.
pub struct Running {
    runtime: Runtime,
    id: String,
    dir: PathBuf,
    upper: PathBuf,
    stubs: Stubs,
    throwaway_upper: bool,
    pid: Option<Pid>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The pty master, with [`Output::Terminal`], until taken.
    terminal: Option<OwnedFd>,
    detacher: Option<std::thread::JoinHandle<()>>,
    clock: Clock,
    _lock: File,
    cleaned: bool,
}

impl Running {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host pid of the container's first process.
    pub fn pid(&self) -> Option<i32> {
        self.pid.map(|p| p.as_raw())
    }

    /// The pty master of a container started with [`Output::Terminal`]
    /// (once): what is written to it is the container's input, what is
    /// read from it its output; resize it with [`tty::WindowSize::apply`].
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    /// Send `signal` to the container's first process.
    pub fn kill(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid.context("container has no process")?;
        let sig = nix::sys::signal::Signal::try_from(signal).context("bad signal number")?;
        nix::sys::signal::kill(pid, sig).context("signalling the container")?;
        Ok(())
    }

    /// Wait for the process to exit, clean up, and return its exit code.
    pub fn wait(self) -> anyhow::Result<i32> {
        self.wait_reporting_exit(|_| Ok(()))
    }

    /// [`Running::wait`], calling `exited` with the exit code as soon as
    /// the container's processes are gone, its output is drained and its
    /// upperdir holds only what they wrote (the mount-point stubs are
    /// out), before the rest of the teardown (cgroup, state
    /// directory): a builder may commit the upperdir from then on while
    /// the teardown runs beside its next step. An error from `exited` is
    /// returned after the teardown.
    pub fn wait_reporting_exit(
        mut self,
        exited: impl FnOnce(i32) -> anyhow::Result<()>,
    ) -> anyhow::Result<i32> {
        let pid = self.pid.context("container has no process")?;
        let status = loop {
            match waitpid(pid, None) {
                Ok(s) => break s,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    let _ = self.cleanup();
                    return Err(e).context("waiting for the container");
                }
            }
        };
        self.pid = None;
        self.clock.mark("run+exit");
        let code = match status {
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
            other => bail!("unexpected wait status {other:?}"),
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.release_upper()?;
        self.clock.mark("stubs out");
        let reported = exited(code);
        self.cleanup()?;
        reported.map(|()| code)
    }

    /// After the container's processes are gone: take its mount-point
    /// stubs out of the upperdir (whose host mounts are detached by then)
    /// and forget them, so the upperdir is the container's diff alone.
    fn release_upper(&mut self) -> anyhow::Result<()> {
        if let Some(d) = self.detacher.take() {
            let _ = d.join();
        }
        if self.throwaway_upper {
            return Ok(());
        }
        // Normally none are left: the detacher unmounted the host's copies.
        for m in overlay::mounts_under(&self.dir)? {
            overlay::unmount(&m)?;
        }
        self.stubs
            .remove_from_upper(&self.upper)
            .with_context(|| format!("container {}: removing mount-point stubs", self.id))?;
        self.stubs = Stubs::default();
        // A sweep after a crash must not touch the upperdir again: it may
        // be a committed snapshot by then.
        match std::fs::remove_file(self.dir.join("stubs")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).context("removing the stub record")
            }
            _ => Ok(()),
        }
    }

    fn setup(&mut self, spec: &ContainerSpec, stdio: Stdio) -> anyhow::Result<()> {
        anyhow::ensure!(!spec.args.is_empty(), "no command to run");
        // The kernel takes milliseconds to make a network namespace: let a
        // helper thread do it while this one mounts and prepares the rootfs
        // (joined before the clone, which needs this process single-threaded),
        // unless the caller lent one.
        let netns_job = match (spec.network, &self.runtime.netns) {
            (NetworkMode::Host, _) | (_, Some(_)) => None,
            (NetworkMode::None | NetworkMode::Default, None) => {
                Some(netns::spawn_loopback_netns())
            }
        };
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir(&rootfs)?;
        let (upper, work) = if spec.rootfs.upper.as_os_str().is_empty() {
            let scratch = self.runtime.scratch_root.join(&self.id);
            let (u, w) = (scratch.join("upper"), scratch.join("work"));
            std::fs::create_dir_all(&u)
                .with_context(|| format!("creating {}", u.display()))?;
            std::fs::create_dir(&w)?;
            self.throwaway_upper = true;
            (u, w)
        } else {
            (spec.rootfs.upper.clone(), spec.rootfs.work.clone())
        };
        self.upper = upper.clone();
        // The standard mount points come from a layer of their own when the
        // image's /etc allows (see `mountpoints`), else as stubs below.
        let standard = mountpoints::layer_for(&self.runtime.state_root, &spec.rootfs.lower)?;
        let mut lower = spec.rootfs.lower.clone();
        lower.extend(standard.clone());
        overlay::mount_overlay(
            &overlay::OverlaySpec {
                lower: &lower,
                upper: Some((&upper, &work)),
            },
            &rootfs,
        )?;
        self.clock.mark("overlay");
        // Mount points the image may lack; recorded so they can be removed.
        let upper = &upper;
        if standard.is_none() {
            for d in ["/proc", "/dev", "/sys"] {
                self.stubs
                    .ensure(&rootfs, upper, Path::new(d), StubKind::Dir)?;
            }
            for f in ["/etc/hosts", "/etc/resolv.conf"] {
                self.stubs
                    .ensure(&rootfs, upper, Path::new(f), StubKind::File)?;
            }
        }
        // Saved before anything else can fail, so a sweep after a crash
        // removes them too (and again after the user's mount points).
        self.save_stub_record()?;
        let mut mounts = Vec::new();
        for (i, m) in spec.mounts.iter().enumerate() {
            anyhow::ensure!(
                m.target.is_absolute(),
                "mount target {} must be absolute",
                m.target.display()
            );
            let kind = match &m.source {
                MountSource::Bind(src) => {
                    let meta = std::fs::metadata(src)
                        .with_context(|| format!("bind source {}", src.display()))?;
                    if meta.is_dir() {
                        StubKind::Dir
                    } else {
                        StubKind::File
                    }
                }
                _ => StubKind::Dir,
            };
            self.stubs.ensure(&rootfs, upper, &m.target, kind)?;
            let host_dir = match &m.source {
                MountSource::Layers(layers) => Some(self.mount_layers(i, layers, m.readonly)?),
                _ => None,
            };
            mounts.push((m.clone(), host_dir));
        }
        self.save_stub_record()?;
        let root_fd = fsat::open_dir(&rootfs)?;
        let cwd = if spec.cwd.is_empty() {
            "/"
        } else {
            spec.cwd.as_str()
        };
        anyhow::ensure!(
            cwd.starts_with('/'),
            "working directory {cwd:?} must be absolute"
        );
        mkdir_all_in_root(&root_fd, Path::new(cwd))
            .with_context(|| format!("creating working directory {cwd}"))?;
        let user = user::resolve_user(root_fd.as_fd(), &spec.user)?;
        drop(root_fd);

        self.clock.mark("stubs+user");
        let hostname = if spec.hostname.is_empty() {
            self.id
                .trim_start_matches("kiln-")
                .chars()
                .take(12)
                .collect()
        } else {
            spec.hostname.clone()
        };
        let hosts_file = self.dir.join("hosts");
        let resolv_file = self.dir.join("resolv.conf");
        std::fs::write(&hosts_file, hosts_content(&hostname, spec.network))?;
        std::fs::write(&resolv_file, resolv_content(spec.network))?;

        let netns = netns_job
            .map(|job| {
                job.join()
                    .map_err(|_| anyhow::anyhow!("network namespace helper thread panicked"))?
            })
            .transpose()?;
        self.clock.mark("netns");
        let netns_path = match (&netns, &self.runtime.netns) {
            (Some(fd), _) => Some(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())),
            (None, Some(lent)) if spec.network != NetworkMode::Host => {
                Some(lent.display().to_string())
            }
            (None, _) => None,
        };
        let config = spec::build(&spec::SpecInput {
            cgroup: &format!("/{}", self.runtime.cgroup_name(&self.id)),
            rootfs: &rootfs,
            args: &spec.args,
            env: &spec.env,
            cwd,
            user: &user,
            hostname: &hostname,
            hosts_file: &hosts_file,
            resolv_file: &resolv_file,
            mounts: &mounts,
            netns_path,
            limits: &spec.limits,
            terminal: matches!(stdio.output, Output::Terminal(_)),
        });
        // The spec goes to libcontainer's process code as a value: no
        // bundle or libcontainer state on disk to write, read back,
        // re-validate and delete for every container (see `create`).
        let oci: libcontainer::oci_spec::runtime::Spec =
            serde_json::from_value(config).context("the generated OCI spec")?;
        self.clock.mark("spec");

        private_cwd()?;
        let console = match stdio.output {
            Output::Terminal(size) => {
                let listener = tty::listen_console(&self.dir, "console.sock")?;
                let sock = libcontainer::tty::setup_console_socket(
                    &self.dir,
                    &self.dir.join("console.sock"),
                    "console-socket",
                )
                .map_err(|e| anyhow::anyhow!("connecting the console socket: {e}"))?;
                Some((listener, sock, size))
            }
            _ => None,
        };
        let mut io = CreateIo::default();
        if stdio.stdin == Stdin::Null && console.is_none() {
            io.stdin = Some(OwnedFd::from(File::open("/dev/null")?));
        }
        // Streamed outputs go through a pipe to a reader thread. So does an
        // inherited output that is /dev/null, its bytes dropped: libcontainer
        // swaps such an fd for the container's own /dev/null opened
        // read-only, and every write to it would fail (EBADF).
        for (fd, stream) in [(1, LogStream::Stdout), (2, LogStream::Stderr)] {
            let sink: LogSink = match &stdio.output {
                Output::Stream(sink) => sink.clone(),
                Output::Inherit if is_dev_null(fd) => std::sync::Arc::new(|_, _: &[u8]| {}),
                _ => continue,
            };
            let (read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
            match stream {
                LogStream::Stdout => io.stdout = Some(write),
                LogStream::Stderr => io.stderr = Some(write),
            }
            self.readers.push(spawn_reader(read, stream, sink));
        }
        // Without limits, the container's processes stay in the shim's
        // cgroups: joining a new one costs an RCU grace period.
        let hidden = if spec.limits.is_empty() {
            Some(cgroupless::HiddenCgroupfs::enter()?)
        } else {
            None
        };
        let created = self.create(oci, &rootfs, io, console.as_ref().map(|(_, sock, _)| sock));
        // Kept before anything else can fail, so that the cleanup kills the
        // created init (which would wait for its start forever).
        self.pid = created.as_ref().ok().copied();
        let private_ns = hidden.map(|h| h.leave()).transpose()?;
        created.with_context(|| format!("creating container {}", self.id))?;
        self.clock.mark("libcontainer create");
        drop(netns);
        if let Some((listener, _, size)) = console {
            // Sized before the process runs, so it never sees 0x0.
            let master = tty::accept_console(&listener)?;
            if size != tty::WindowSize::default() {
                size.apply(master.as_fd())?;
            }
            self.terminal = Some(master);
        }
        // The container's mount namespace now holds its own copies of the
        // overlay and layer mounts (private: nothing propagates between
        // them). Detach the host's copies while the container runs: an
        // unmount waits for an RCU grace period, which on a busy host costs
        // tens of milliseconds, and this keeps it off the critical path.
        // Found by the thread too (a read of mountinfo): whatever is left
        // when the process ends is unmounted by `release_upper`.
        let dir = self.dir.clone();
        self.detacher = Some(std::thread::spawn(move || {
            match overlay::mounts_under(&dir) {
                Ok(host_mounts) => {
                    for m in host_mounts {
                        if let Err(e) = overlay::unmount(&m) {
                            tracing::warn!("{e:#}");
                        }
                    }
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
            // The last reference to the namespace the container was created
            // in: its teardown waits for a grace period too.
            drop(private_ns);
        }));
        NotifySocket::new(self.dir.join(NOTIFY_SOCKET))
            .notify_container_start()
            .map_err(|e| anyhow::anyhow!("starting container {}: {e}", self.id))?;
        self.clock.mark("start");
        Ok(())
    }

    /// Create the container (its init process waits for the start signal on
    /// [`NOTIFY_SOCKET`]); returns the init's host pid.
    ///
    /// This is what libcontainer's `ContainerBuilder` does, minus the disk
    /// round trip: the builder writes the spec to a bundle and then to a
    /// state dir, reads it back, validates it, saves a `state.json` (again
    /// at start), and its delete re-reads it all. kiln makes the spec itself
    /// and keeps each container's state in its own directory, so it calls
    /// libcontainer's process code with the spec in memory. libcontainer's
    /// spec validation still runs.
    fn create(
        &self,
        spec: libcontainer::oci_spec::runtime::Spec,
        rootfs: &Path,
        io: CreateIo,
        console: Option<&OwnedFd>,
    ) -> anyhow::Result<Pid> {
        use libcontainer::process::args::{ContainerArgs, ContainerType};
        libcontainer::validator::Validator::validate_spec(&spec)
            .map_err(|e| anyhow::anyhow!("invalid container spec: {e}"))?;
        let cgroup_path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .context("the spec names no cgroup")?;
        let notify_listener = libcontainer::notify_socket::NotifyListener::new(&self.dir.join(NOTIFY_SOCKET))
            .map_err(|e| anyhow::anyhow!("notify socket: {e}"))?;
        // As libcontainer's builder: no ptrace of, or /proc access to, this
        // process (and the container processes it clones) by the container.
        // SAFETY: prctl(2) with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_DUMPABLE, 0)");
        }
        let args = ContainerArgs {
            container_type: ContainerType::InitContainer,
            syscall: SyscallType::default(),
            spec: std::rc::Rc::new(spec),
            rootfs: rootfs.to_path_buf(),
            console_socket: console.map(|c| c.as_raw_fd()),
            notify_listener,
            preserve_fds: 0,
            // In memory only: libcontainer reads it for the seccomp set-up
            // (the OCI state a seccomp agent would be sent) and for hooks
            // (kiln sets none).
            container: Some(Container {
                state: libcontainer::container::State::new(
                    &self.id,
                    libcontainer::container::ContainerStatus::Creating,
                    None,
                    self.dir.clone(),
                ),
                root: self.dir.clone(),
            }),
            user_ns_config: None,
            cgroup_config: libcgroups::common::CgroupConfig {
                cgroup_path,
                systemd_cgroup: false,
                container_name: self.id.clone(),
            },
            detached: true,
            executor: Box::new(workload::ExecveExecutor),
            no_pivot: false,
            stdin: io.stdin.as_ref().map(|f| f.as_raw_fd()),
            stdout: io.stdout.as_ref().map(|f| f.as_raw_fd()),
            stderr: io.stderr.as_ref().map(|f| f.as_raw_fd()),
            as_sibling: false,
            pid_file: None,
        };
        // `io` stays open until here: the clones inherit its fds.
        let pid = libcontainer::process::container_main_process::container_main_process(&args)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        drop(io);
        Ok(pid)
    }

    /// Mount layer directories for a [`MountSource::Layers`] mount under the
    /// state dir; returns the host directory to bind into the container.
    fn mount_layers(
        &self,
        index: usize,
        layers: &[PathBuf],
        readonly: bool,
    ) -> anyhow::Result<PathBuf> {
        if readonly && layers.len() == 1 {
            // overlayfs wants two lowers when there is no upper; one
            // read-only layer is simply bind-mounted read-only.
            anyhow::ensure!(
                layers[0].is_dir(),
                "layer mount: {} is not a directory",
                layers[0].display()
            );
            return Ok(layers[0].clone());
        }
        let base = self.dir.join("mounts").join(index.to_string());
        let target = base.join("merged");
        std::fs::create_dir_all(&target)?;
        if readonly {
            overlay::mount_overlay(
                &overlay::OverlaySpec {
                    lower: layers,
                    upper: None,
                },
                &target,
            )?;
        } else {
            let (upper, work) = (base.join("upper"), base.join("work"));
            std::fs::create_dir(&upper)?;
            std::fs::create_dir(&work)?;
            overlay::mount_overlay(
                &overlay::OverlaySpec {
                    lower: layers,
                    upper: Some((&upper, &work)),
                },
                &target,
            )?;
        }
        Ok(target)
    }

    /// Persist what was created, so a sweep after a crash can remove it.
    fn save_stub_record(&self) -> anyhow::Result<()> {
        if self.throwaway_upper {
            return Ok(());
        }
        let text = format!("{}\n{}", self.upper.display(), self.stubs.to_record());
        std::fs::write(self.dir.join("stubs"), text).context("saving stub record")
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(d) = self.detacher.take() {
            let _ = d.join();
        }
        self.clock.mark("join");
        let stubs = (!self.throwaway_upper).then_some((self.upper.as_path(), &self.stubs));
        let r = self.runtime.cleanup_state(&self.id, stubs);
        self.clock.mark("unmount+stubs+state");
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::error!("cleaning up container {}: {e:#}", self.id);
        }
    }
}

/// A thread passing what `read` yields to `sink` as `stream`, until the
/// end (or an error, such as EIO on a pty master whose container is gone).
pub(crate) fn spawn_reader(read: OwnedFd, stream: LogStream, sink: LogSink) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = File::from(read);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink(stream, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

/// True if `fd` is open on the null device (char 1:3), as libcontainer
/// tests it.
fn is_dev_null(fd: i32) -> bool {
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return false;
    };
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

/// `mkdir -p` of an absolute container path, never following symlinks.
fn mkdir_all_in_root(root: &OwnedFd, path: &Path) -> anyhow::Result<()> {
    let mut dir = root.try_clone()?;
    for name in fsat::components(path)? {
        match fsat::lstat_at(dir.as_fd(), name)? {
            None => fsat::mkdir_at(dir.as_fd(), name, 0o755)?,
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                // A symlinked working directory is resolved by the container
                // itself at chdir time, inside its root.
                return Ok(());
            }
            Some(_) => bail!("{} exists and is not a directory", path.display()),
        }
        dir = fsat::open_beneath(
            dir.as_fd(),
            Path::new(name),
            libc::O_DIRECTORY | libc::O_RDONLY,
            fsat::Resolve::NoSymlinks,
        )?;
    }
    Ok(())
}

fn hosts_content(hostname: &str, network: NetworkMode) -> String {
    if network == NetworkMode::Host {
        if let Ok(h) = std::fs::read_to_string("/etc/hosts") {
            return h;
        }
    }
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n127.0.1.1\t{hostname}\n"
    )
}

/// The host's resolv.conf; outside the host namespace, loopback name
/// servers (unreachable from there) are dropped, as docker does.
fn resolv_content(network: NetworkMode) -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if network == NetworkMode::Host {
        return host;
    }
    host.lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            !(w.next() == Some("nameserver")
                && w.next()
                    .is_some_and(|ip| ip.starts_with("127.") || ip == "::1"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    anyhow::ensure!(
        ok,
        "container name {name:?}: use letters, digits, `_`, `.` and `-` only"
    );
    Ok(())
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    format!("kiln-{}", hex::encode(bytes))
}

fn read_stub_record(dir: &Path) -> Option<(PathBuf, Stubs)> {
    let text = std::fs::read_to_string(dir.join("stubs")).ok()?;
    let (upper, rest) = text.split_once('\n')?;
    Some((PathBuf::from(upper), Stubs::from_record(rest)?))
}

/// The container init's notify socket, in its state dir: it waits there
/// for the start signal.
const NOTIFY_SOCKET: &str = "notify.sock";

/// The fds a container's init gets as stdin, stdout and stderr (`None`:
/// the shim's own).
#[derive(Default)]
struct CreateIo {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// Phase timings for profiling container start and teardown.
struct Clock {
    last: Option<std::time::Instant>,
}

impl Clock {
    fn new(enabled: bool) -> Clock {
        Clock {
            last: enabled.then(std::time::Instant::now),
        }
    }

    fn mark(&mut self, phase: &str) {
        if let Some(last) = self.last {
            eprintln!(
                "kiln-runtime: {phase:<22} {:>8.2} ms",
                last.elapsed().as_secs_f64() * 1000.0
            );
            self.last = Some(std::time::Instant::now());
        }
    }
}

thread_local! {
    static PRIVATE_CWD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Give the calling thread its own working directory (`unshare(CLONE_FS)`).
///
/// libcontainer creates and connects its notify socket by `chdir`ing into
/// the container's state dir and back; with a shared cwd, containers
/// started concurrently from several threads would pull the working
/// directory from under each other (and out from under the rest of kiln).
fn private_cwd() -> anyhow::Result<()> {
    if !PRIVATE_CWD.get() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).context("unshare(CLONE_FS)")?;
        PRIVATE_CWD.set(true);
    }
    Ok(())
}

//! Helpers for the runtime tests: a busybox rootfs, a scratch area with
//! upper/work dirs, and output capture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_engine::executor::{Shim, ShimOptions, ShimProcess};
use kiln_engine::runtime::{ContainerSpec, LogSink, LogStream, Rootfs, Runtime};

/// Why a test cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox (busybox-static) is not installed".into());
    }
    None
}

/// Skip the test (with a message) unless containers can run here.
#[macro_export]
macro_rules! require_containers {
    () => {
        if let Some(why) = runtime_common::skip_reason() {
            println!("skipped: containers unavailable because {why}");
            return;
        }
    };
}

/// For the few tests that start containers in this (multi-threaded) test
/// process instead of through the shim: one at a time. libcontainer 0.7's
/// cloned child exits through `std::process::exit`, which takes a
/// std-internal mutex that threads also take when they start or exit; a
/// test thread finishing at the moment of the clone can leave that child
/// hung (the reason for the shim).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory holding layers, upper/work dirs and runtime state.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("kiln-rt-test")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A runtime whose state lives in this scratch dir.
    pub fn runtime(&self) -> Runtime {
        Runtime::new(self.path().join("run")).unwrap()
    }

    /// A shim (the `kiln` binary under test) with state in this scratch dir.
    pub fn shim(&self) -> Shim {
        Shim::new(env!("CARGO_BIN_EXE_kiln"), self.path().join("run"))
    }

    /// Run `spec` to the end in a shim; its exit code.
    pub fn run(&self, spec: &ContainerSpec, sink: LogSink) -> anyhow::Result<i32> {
        self.shim()
            .start(spec, ShimOptions::default(), sink)?
            .wait()
    }

    /// Start `spec` in a shim.
    pub fn start(&self, spec: &ContainerSpec, sink: LogSink, opts: ShimOptions) -> ShimProcess {
        self.shim().start(spec, opts, sink).unwrap()
    }

    /// A layer directory `name` with busybox, its applets and a small /etc.
    pub fn busybox_layer(&self, name: &str) -> PathBuf {
        let root = self.path().join(name);
        make_busybox_rootfs(&root);
        root
    }

    /// An empty layer dir.
    pub fn layer(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Fresh upper/work dirs named after `name`.
    pub fn rootfs(&self, lower: Vec<PathBuf>, name: &str) -> Rootfs {
        let upper = self.path().join(format!("{name}.upper"));
        let work = self.path().join(format!("{name}.work"));
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        Rootfs { lower, upper, work }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Never let TempDir recurse into a still-mounted overlay.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let me = self.path().to_string_lossy().into_owned();
        for line in mounts.lines() {
            if let Some(p) = line.split(' ').nth(4) {
                if p.starts_with(&me) {
                    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

/// busybox + applet symlinks + /etc/passwd and /etc/group.
pub fn make_busybox_rootfs(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" || applet.is_empty() {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nstaff:x:50:alice\nalice:x:1000:\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("root")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
}

/// Collects a container's output.
#[derive(Clone, Default)]
pub struct Capture {
    pub stdout: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
}

impl Capture {
    pub fn sink(&self) -> LogSink {
        let me = self.clone();
        Arc::new(move |stream, bytes| match stream {
            LogStream::Stdout => me.stdout.lock().unwrap().extend_from_slice(bytes),
            LogStream::Stderr => me.stderr.lock().unwrap().extend_from_slice(bytes),
        })
    }
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

/// Every entry below `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Mount points below `dir` in this namespace.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let me = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&me))
        .collect()
}

/// Processes (pid, name) that have a file open, their cwd or their root
/// at or below `dir`: leftovers of containers run from there.
pub fn processes_using(dir: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me || is_dead(pid) {
            continue;
        }
        let proc_dir = e.path();
        let mut links: Vec<PathBuf> = ["cwd", "root"].iter().map(|l| proc_dir.join(l)).collect();
        if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        if links
            .iter()
            .any(|l| std::fs::read_link(l).is_ok_and(|t| t.starts_with(dir)))
        {
            let name = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            out.push((pid, name.trim().to_string()));
        }
    }
    out
}

/// Gone, or a zombie waiting to be reaped by someone else.
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Cgroup directories (in any hierarchy) whose path relative to the
/// hierarchy's root starts with `prefix` (e.g. `kiln/<tag>-`).
pub fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let (parent, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out = Vec::new();
    for line in info.lines().filter(|l| l.contains(" - cgroup")) {
        let Some(mount) = line.split(' ').nth(4) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(Path::new(mount).join(parent)) else {
            continue;
        };
        out.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(start))
                .map(|e| e.path()),
        );
    }
    out
}

/// Poll `f` until it holds; panics after 15 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Assert that nothing of the containers run with state under `state_root`
/// (inside scratch dir `scratch`) is left: no state, mounts, processes or
/// cgroups.
pub fn assert_nothing_left(scratch: &Path, state_root: &Path) {
    // Sweeps what dead owners left (killing their orphans) ...
    let rt = Runtime::new(state_root).unwrap();
    // ... while live shims finish cleaning up (they hold their lock file).
    wait_for("leftover processes to exit", || {
        processes_using(scratch).is_empty()
    });
    let prefix = rt.cgroup_name("");
    for sub in ["containers", "libcontainer"] {
        let left: Vec<_> = std::fs::read_dir(state_root.join(sub))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{sub} state left: {left:?}");
    }
    for dir in [scratch, rt.state_root()] {
        assert!(
            mounts_below(dir).is_empty(),
            "mounts left: {:?}",
            mounts_below(dir)
        );
    }
    let cgroups = cgroups_with_prefix(&prefix);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

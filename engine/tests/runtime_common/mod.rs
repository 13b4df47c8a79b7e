//! Helpers for the runtime tests: a busybox rootfs, a scratch area with
//! upper/work dirs, and output capture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_engine::runtime::{LogSink, LogStream, Rootfs, Runtime};

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

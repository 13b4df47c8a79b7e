//! Test support for the daemon: a real `kiln serve` process on a socket in
//! a temp dir with its own store root, raw HTTP over that socket, and a
//! store preloaded with busybox.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common;

/// A running `kiln serve`.
pub struct Daemon {
    /// Temp dir holding the socket and the log.
    pub dir: tempfile::TempDir,
    /// The store root.
    pub root: PathBuf,
    /// The socket.
    pub socket: PathBuf,
    /// Extra environment of the daemon process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    /// Start a daemon on a fresh root (with busybox loaded when `busybox`).
    pub fn start(busybox: bool, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        if busybox {
            common::kiln_ok(&root, &["load", "-i", common::busybox_layout().to_str().unwrap(), "-t", "busybox:latest"]);
        }
        Self::start_on(dir, root, extra)
    }

    /// Start a daemon in `dir` serving `root`.
    pub fn start_on(dir: tempfile::TempDir, root: PathBuf, extra: &[&str]) -> Daemon {
        Self::start_env(dir, root, extra, &[])
    }

    /// [`Daemon::start_on`] with extra environment variables for the daemon.
    pub fn start_env(dir: tempfile::TempDir, root: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = dir.path().join("kiln.sock");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut daemon = Daemon { dir, root, socket, env, child: None };
        daemon.spawn(extra);
        daemon
    }

    fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(&self.root)
            .arg("serve")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(extra)
            .env("KILN_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kiln serve exited early ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "kiln serve did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `unix:///.../kiln.sock`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start again after [`Daemon::stop`].
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn(extra);
    }

    /// `kiln --host THIS ARGS...` (no --root: the client must not need one).
    pub fn client(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln")).arg("--host").arg(self.host()).args(args).output().unwrap()
    }

    /// [`Daemon::client`] run in the directory `cwd`.
    pub fn client_in(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln")).current_dir(cwd).arg("--host").arg(self.host()).args(args).output().unwrap()
    }

    /// [`Daemon::client`] with `SOURCE_DATE_EPOCH=0`, for comparable image IDs.
    pub fn client_reproducible(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--host")
            .arg(self.host())
            .args(args)
            .env("SOURCE_DATE_EPOCH", "0")
            .output()
            .unwrap()
    }

    /// Raw HTTP/1.0 over the socket: (status, headers, body).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        raw_http(&self.socket, method, path, &[], body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send one HTTP/1.0 request (so the response ends with the connection).
pub fn raw_http(socket: &Path, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: kiln\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The daemon may refuse before reading everything (413): ignore EPIPE.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

/// Split a raw response into (status, headers, body).
pub fn parse_response(out: &[u8]) -> (u16, String, Vec<u8>) {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(out)));
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, out[end + 4..].to_vec())
}

/// Write `files` (relative name, text) under `dir`, creating directories.
pub fn write(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

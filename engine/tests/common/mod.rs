//! Test support: a real CNCF registry (`docker-registry`) on a free
//! loopback port, a busybox image made without kiln, and running the
//! `kiln` binary.
//!
//! `TestRegistry::with_busybox()` uses the registry of `scripts/testenv.sh`
//! when `KILN_TEST_REGISTRY` is set, and otherwise starts its own, so plain
//! `cargo test` works. Registries this module starts are killed on drop.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Whether `tool` is on PATH; prints the standard skip line when not.
pub fn have(tool: &str, test: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        println!("skipped: {test} because {tool} is not installed (scripts/deps.sh installs it)");
    }
    found
}

/// Whether a test that runs containers can run here: root, and each of
/// `tools` on PATH; prints the standard skip line when not.
pub fn can_run_containers(test: &str, tools: &[&str]) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: {test} because containers need root");
        return false;
    }
    tools.iter().all(|tool| have(tool, test))
}

/// The ustar header of a regular file of `size` bytes: `name` written raw
/// (so `..` is allowed; at most 100 bytes), `mode`, owned by root, mtime
/// 1600000000, checksum set.
pub fn regular_file_header(name: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// The set-up of a build test: a registry serving busybox, the
/// `--registry-mirror` value that sends `docker.io` there, and a temporary
/// directory holding the store root `root` (not yet created) and an empty
/// build context `ctx`. Bind every field (`registry: _registry`, `tmp: _tmp`
/// when unused): dropping one stops the registry or deletes the directories.
pub struct BuildDirs {
    /// The registry; keep it alive for the test.
    pub registry: TestRegistry,
    /// `docker.io=http://ADDR`, for `--registry-mirror`.
    pub mirror: String,
    /// Holds `root` and `ctx`; deleted on drop.
    pub tmp: tempfile::TempDir,
    /// `TMP/root`, the store root.
    pub root: PathBuf,
    /// `TMP/ctx`, an empty directory.
    pub ctx: PathBuf,
}

impl BuildDirs {
    /// Start (or reuse) the busybox registry and make the directories.
    pub fn new() -> BuildDirs {
        let registry = TestRegistry::with_busybox();
        let mirror = format!("docker.io=http://{}", registry.addr);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        BuildDirs { registry, mirror, tmp, root, ctx }
    }
}

/// A running registry.
pub struct TestRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

/// Optional basic auth for [`TestRegistry::start_with`].
pub struct BasicAuth {
    /// bcrypt htpasswd line, `user:$2b$...`.
    pub htpasswd_line: &'static str,
}

/// `kiln:kiln-secret`, bcrypt cost 4.
pub const TEST_USER: (&str, &str) = ("kiln", "kiln-secret");
/// htpasswd line for [`TEST_USER`].
pub const TEST_HTPASSWD: &str = "kiln:$2b$04$R97lXJIaHQcsFtSi.XQEdODV0nTv2N6s0.pytBL6.y.Nu9BnVf1ja";

impl TestRegistry {
    /// Start an empty registry of our own.
    pub fn start() -> TestRegistry {
        Self::start_with(None)
    }

    /// Start an empty registry; with `auth`, it demands HTTP basic auth.
    pub fn start_with(auth: Option<BasicAuth>) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some(auth) = auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{}\n", auth.htpasswd_line)).unwrap();
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n", htpasswd.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let addr = format!("127.0.0.1:{port}");
        let mut reg = TestRegistry { addr, child: Some(child), dir: Some(dir) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(&reg.addr).is_err() {
            if let Some(status) = reg.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(reg.dir.as_ref().unwrap().path().join("registry.log")).unwrap();
                panic!("docker-registry exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "docker-registry did not come up on {}", reg.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// The registry of `scripts/testenv.sh` if `KILN_TEST_REGISTRY` is set,
    /// else a registry of our own with busybox pushed to `library/busybox:latest`.
    pub fn with_busybox() -> TestRegistry {
        if let Ok(addr) = std::env::var("KILN_TEST_REGISTRY")
            && !addr.is_empty()
        {
            return TestRegistry { addr, child: None, dir: None };
        }
        let reg = Self::start();
        reg.push_busybox("library/busybox:latest");
        reg
    }

    /// The storage directory, for registries we started.
    pub fn storage(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("storage"))
    }

    /// Push the busybox OCI layout to `repo_tag` with skopeo; returns the
    /// manifest digest.
    pub fn push_busybox(&self, repo_tag: &str) -> String {
        let layout = busybox_layout();
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
        busybox_manifest_digest()
    }

    /// A plain HTTP/1.1 request to the registry: `(status, body)`.
    pub fn http(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
        let (status, _, body) = self.http_full(method, path, content_type, body);
        (status, body)
    }

    /// A plain HTTP/1.1 request to the registry: `(status, headers, body)`.
    pub fn http_full(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut resp = Vec::new();
        stream.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8_lossy(&resp);
        let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(resp.len());
        (status, String::from_utf8_lossy(&resp[..split]).into_owned(), resp[split..].to_vec())
    }

    /// Upload `bytes` as a blob of `repo` (POST a session, PUT the bytes).
    pub fn put_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let (status, headers, _) = self.http_full("POST", &format!("/v2/{repo}/blobs/uploads/"), None, b"");
        assert_eq!(status, 202, "blob upload session: {headers}");
        let location = headers
            .lines()
            .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
            .expect("upload location")
            .trim();
        let path = location.strip_prefix(&format!("http://{}", self.addr)).unwrap_or(location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, body) =
            self.http("PUT", &format!("{path}{sep}digest={digest}"), Some("application/octet-stream"), bytes);
        assert_eq!(status, 201, "blob upload: {}", String::from_utf8_lossy(&body));
        digest
    }

    /// Put a manifest under `repo:tag`.
    pub fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) {
        let (status, body) = self.http("PUT", &format!("/v2/{repo}/manifests/{tag}"), Some(media_type), bytes);
        assert_eq!(status, 201, "manifest upload: {}", String::from_utf8_lossy(&body));
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

struct Layout {
    dir: tempfile::TempDir,
    digest: String,
}

fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/make-busybox-image.sh"))
            .arg(dir.path().join("oci"))
            .output()
            .unwrap();
        assert!(out.status.success(), "make-busybox-image.sh: {}", String::from_utf8_lossy(&out.stderr));
        let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Layout { dir, digest }
    })
}

/// An OCI layout with busybox:latest (made once per test process).
pub fn busybox_layout() -> PathBuf {
    layout().dir.path().join("oci")
}

/// Manifest digest of [`busybox_layout`]'s image.
pub fn busybox_manifest_digest() -> String {
    layout().digest.clone()
}

/// Run `kiln --root ROOT ARGS...`.
pub fn kiln(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).arg("--root").arg(root).args(args).output().unwrap()
}

/// Run kiln and insist it succeeds; returns stdout.
pub fn kiln_ok(root: &Path, args: &[&str]) -> String {
    let out = kiln(root, args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run kiln and insist it fails; returns stderr.
pub fn kiln_err(root: &Path, args: &[&str]) -> String {
    let out = kiln(root, args);
    assert!(!out.status.success(), "kiln {args:?} should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// Files under `dir` (recursively), relative, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

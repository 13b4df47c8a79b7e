//! Support for the kiln-vs-buildah equivalence test: the cases under
//! `testdata/equiv/`, reading an OCI image layout into a flat filesystem
//! tree (layers applied with their whiteouts, in memory), the config fields
//! the test compares, and a tiny loopback HTTP file server for `ADD <url>`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One directory of `testdata/equiv/`.
#[derive(Debug, Clone)]
pub struct Case {
    /// Directory name, e.g. `12-copy-globs-dirs`.
    pub name: String,
    /// The context directory (holds the Dockerfile).
    pub dir: PathBuf,
    /// `--build-arg K=V` values (after `{SERVER}` substitution).
    pub build_args: Vec<String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--secret id=ID,src=ABSOLUTE_PATH`.
    pub secrets: Vec<String>,
    /// Secret values, to scan kiln's outputs for.
    pub secret_values: Vec<Vec<u8>>,
    /// Cases whose image this one uses (built before it, same builder).
    pub after: Vec<String>,
    /// Extra `buildah build` flags, standing in for Dockerfile flags
    /// buildah lacks (e.g. `--network=none` for `RUN --network=none`).
    pub buildah_flags: Vec<String>,
}

impl Case {
    /// The image name both builders tag the result with.
    pub fn image_name(&self) -> String {
        format!("equiv-{}", self.name)
    }

    /// The flags both builders take alike: `--build-arg`, `--target`,
    /// `--secret`.
    pub fn shared_build_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for a in &self.build_args {
            flags.extend(["--build-arg".to_string(), a.clone()]);
        }
        if let Some(t) = &self.target {
            flags.extend(["--target".to_string(), t.clone()]);
        }
        for s in &self.secrets {
            flags.extend(["--secret".to_string(), s.clone()]);
        }
        flags
    }

    /// The Dockerfile buildah builds: `Dockerfile.buildah` when buildah
    /// lacks a feature (it spells out what BuildKit does), else `Dockerfile`.
    pub fn buildah_dockerfile(&self) -> PathBuf {
        let alt = self.dir.join("Dockerfile.buildah");
        if alt.is_file() { alt } else { self.dir.join("Dockerfile") }
    }
}

/// All cases, sorted by name. `server` replaces `{SERVER}` in `args` files.
///
/// An `args` file has one directive a line: `build-arg K=V`, `target STAGE`,
/// `secret id=ID,src=FILE` (FILE relative to the case), `after CASE` or
/// `buildah-flag FLAG`.
pub fn load_cases(root: &Path, server: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut case = Case {
            name,
            dir: dir.clone(),
            build_args: vec![],
            target: None,
            secrets: vec![],
            secret_values: vec![],
            after: vec![],
            buildah_flags: vec![],
        };
        if let Ok(text) = std::fs::read_to_string(dir.join("args")) {
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (key, value) = line.split_once(' ').unwrap_or((line, ""));
                let value = value.trim().replace("{SERVER}", server);
                match key {
                    "build-arg" => case.build_args.push(value),
                    "target" => case.target = Some(value),
                    "after" => case.after.push(value),
                    "buildah-flag" => case.buildah_flags.push(value),
                    "secret" => {
                        let mut parts = Vec::new();
                        for kv in value.split(',') {
                            match kv.split_once('=') {
                                Some(("src", src)) => {
                                    let path = dir.join(src);
                                    case.secret_values.push(std::fs::read(&path).unwrap());
                                    parts.push(format!("src={}", path.display()));
                                }
                                _ => parts.push(kv.to_string()),
                            }
                        }
                        case.secrets.push(parts.join(","));
                    }
                    other => panic!("{}/args:{}: unknown directive {other:?}", dir.display(), n + 1),
                }
            }
        }
        cases.push(case);
    }
    cases
}

/// One filesystem entry of an image, without times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `file`, `dir`, `symlink`, `fifo`, `char`, `block`.
    pub kind: &'static str,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Symlink target.
    pub link: Option<String>,
    /// sha256 of a regular file's bytes, plus the bytes when short text.
    pub content: Option<String>,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:04o} {}:{}", self.kind, self.mode, self.uid, self.gid)?;
        if let Some(l) = &self.link {
            write!(f, " -> {l}")?;
        }
        if let Some(c) = &self.content {
            write!(f, " {c}")?;
        }
        Ok(())
    }
}

/// A filesystem: normalized path (no leading `/`) → entry.
pub type Tree = BTreeMap<String, Entry>;

/// An image read from an OCI layout: its rootfs and its config JSON.
pub struct LayoutImage {
    /// The final filesystem.
    pub tree: Tree,
    /// The config blob.
    pub config: Value,
    /// Every blob's raw bytes plus every decompressed layer, for byte scans.
    pub all_bytes: Vec<Vec<u8>>,
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let (alg, hex) = digest.split_once(':').unwrap();
    std::fs::read(layout.join("blobs").join(alg).join(hex)).unwrap_or_else(|e| panic!("blob {digest}: {e}"))
}

fn decompress(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(bytes).unwrap().read_to_end(&mut out).unwrap();
    } else {
        out = bytes.to_vec();
    }
    out
}

/// Read the (single) image of the OCI layout at `layout`.
pub fn read_layout(layout: &Path) -> LayoutImage {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut desc = index["manifests"][0].clone();
    let mut all_bytes = Vec::new();
    // Follow nested indexes down to a manifest.
    let manifest: Value = loop {
        let bytes = blob(layout, desc["digest"].as_str().unwrap());
        all_bytes.push(bytes.clone());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        if v.get("manifests").is_some() {
            desc = v["manifests"][0].clone();
        } else {
            break v;
        }
    };
    let config_bytes = blob(layout, manifest["config"]["digest"].as_str().unwrap());
    all_bytes.push(config_bytes.clone());
    let config: Value = serde_json::from_slice(&config_bytes).unwrap();
    let mut tree = Tree::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let raw = blob(layout, layer["digest"].as_str().unwrap());
        let tar_bytes = decompress(&raw);
        apply_layer(&mut tree, &tar_bytes);
        all_bytes.push(raw);
        all_bytes.push(tar_bytes);
    }
    LayoutImage { tree, config, all_bytes }
}

fn normalize(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
    if p == "." { String::new() } else { p.to_string() }
}

fn describe_content(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(bytes));
    match std::str::from_utf8(bytes) {
        Ok(text) if bytes.len() <= 120 => format!("sha256:{} {:?}", &hash[..12], text),
        _ => format!("sha256:{} ({} bytes)", &hash[..12], bytes.len()),
    }
}

/// Apply one uncompressed layer tar to `tree` (whiteouts, opaque dirs, hardlinks).
pub fn apply_layer(tree: &mut Tree, tar_bytes: &[u8]) {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut additions: Vec<(String, Entry)> = Vec::new();
    let mut removals: Vec<String> = Vec::new();
    let mut opaque: Vec<String> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = normalize(&entry.path().unwrap().to_string_lossy());
        let (parent, base) = match path.rfind('/') {
            Some(i) => (path[..i].to_string(), path[i + 1..].to_string()),
            None => (String::new(), path.clone()),
        };
        if base == ".wh..wh..opq" {
            opaque.push(parent);
            continue;
        }
        if let Some(name) = base.strip_prefix(".wh.") {
            removals.push(if parent.is_empty() { name.to_string() } else { format!("{parent}/{name}") });
            continue;
        }
        let header = entry.header().clone();
        let mode = header.mode().unwrap() & 0o7777;
        let uid = header.uid().unwrap();
        let gid = header.gid().unwrap();
        let kind = header.entry_type();
        let e = if kind.is_hard_link() {
            let target = normalize(&entry.link_name().unwrap().unwrap().to_string_lossy());
            let found = additions
                .iter()
                .rev()
                .find(|(p, _)| *p == target)
                .map(|(_, e)| e.clone())
                .or_else(|| tree.get(&target).cloned())
                .unwrap_or_else(|| panic!("hardlink {path} to missing {target}"));
            found
        } else {
            let (kind_name, link, content) = if kind.is_dir() {
                ("dir", None, None)
            } else if kind.is_symlink() {
                ("symlink", Some(entry.link_name().unwrap().unwrap().to_string_lossy().into_owned()), None)
            } else if kind.is_fifo() {
                ("fifo", None, None)
            } else if kind.is_character_special() {
                ("char", None, None)
            } else if kind.is_block_special() {
                ("block", None, None)
            } else {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                ("file", None, Some(describe_content(&bytes)))
            };
            Entry { kind: kind_name, mode, uid, gid, link, content }
        };
        additions.push((path, e));
    }
    for dir in opaque {
        let prefix = format!("{dir}/");
        tree.retain(|p, _| !p.starts_with(&prefix));
    }
    for gone in removals {
        let prefix = format!("{gone}/");
        tree.retain(|p, _| *p != gone && !p.starts_with(&prefix));
    }
    for (path, e) in additions {
        if path.is_empty() {
            continue; // the root itself: its metadata is the runtime's, not the image's
        }
        // A non-directory replacing a directory drops what was below it.
        if e.kind != "dir" {
            let prefix = format!("{path}/");
            tree.retain(|p, _| !p.starts_with(&prefix));
        }
        tree.insert(path, e);
    }
}

/// The config fields the test compares, normalized: absent, `null`, `[]`
/// and `{}` are all "unset" (docker treats them alike).
pub const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "OnBuild",
];

/// `config` (the `config` object of an image config) reduced to
/// [`CONFIG_FIELDS`], unset ones dropped.
pub fn config_fields(config: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for field in CONFIG_FIELDS {
        let v = config.get(*field).cloned().unwrap_or(Value::Null);
        let unset = match &v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        if !unset {
            out.insert(field.to_string(), v);
        }
    }
    out
}

/// Serve the files of `dir` at `http://ADDR/files/NAME` from a background
/// thread (plain HTTP/1.0, GET only); returns `127.0.0.1:PORT`.
pub fn serve_files(dir: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                // Drain the headers.
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" || line == "\n" {
                        break;
                    }
                }
                let mut parts = request_line.split_whitespace();
                let method = parts.next().unwrap_or("");
                let path = parts.next().unwrap_or("");
                let file = path.strip_prefix("/files/").filter(|n| !n.contains('/') && !n.contains(".."));
                let body = file.and_then(|n| std::fs::read(dir.join(n)).ok());
                let response = match body {
                    Some(body) => {
                        let mut r = format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nLast-Modified: Tue, 15 Nov 1994 12:45:26 GMT\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        if method != "HEAD" {
                            r.extend(body);
                        }
                        r
                    }
                    None => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                };
                let _ = stream.write_all(&response);
            });
        }
    });
    addr
}

/// Paths of `RUN --mount` targets in `dockerfile` (normalized, no leading
/// `/`), including the default `/run/secrets/ID` of secret mounts.
pub fn mount_targets(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for chunk in dockerfile.split("--mount=").skip(1) {
        let spec = chunk.split_whitespace().next().unwrap_or("");
        let mut target = None;
        let mut id = None;
        let mut secret = false;
        for kv in spec.split(',') {
            match kv.split_once('=') {
                Some(("target" | "dst" | "destination", v)) => target = Some(v.to_string()),
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("type", "secret")) => secret = true,
                _ => {}
            }
        }
        if target.is_none() && secret {
            target = id.map(|id| format!("/run/secrets/{id}"));
        }
        if let Some(t) = target {
            out.push(normalize(&t));
        }
    }
    out
}

//! Shared fixtures: a temp store with a synthetic snapshot chain in overlay
//! format, and tree comparison.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_cache::Store;
use kiln_cache::snapshots::SnapshotMeta;
use kiln_exporter::ImageSpec;
use oci_spec::image::{History, HistoryBuilder};

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::lsetxattr(cstr(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} on {}: {}", p.display(), std::io::Error::last_os_error());
}

pub fn whiteout(p: &Path) {
    let r = unsafe { libc::mknod(cstr(p).as_ptr(), libc::S_IFCHR, 0) };
    assert_eq!(r, 0, "mknod {}: {}", p.display(), std::io::Error::last_os_error());
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    assert_eq!(unsafe { libc::lchown(cstr(p).as_ptr(), uid, gid) }, 0);
}

fn write(p: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Commit a snapshot filled by `fill`.
pub fn snapshot(store: &Store, id: &str, fill: impl FnOnce(&Path)) -> String {
    let active = store.snapshots.prepare().unwrap();
    fill(&active.fs());
    store.snapshots.commit(active, id, &SnapshotMeta::default()).unwrap();
    id.to_string()
}

pub const LONG_DIR: &str = "deep/a-directory-name-that-is-quite-long-to-push-past-the-ustar-limit/and-another-long-component-here";

/// Three layers: a base with busybox, a symlink, a hardlink pair, an
/// xattr, a setuid file owned by 1000; a second with a whiteout, an opaque
/// dir, a changed file and a long path; a third that is empty.
pub fn chain(store: &Store) -> Vec<String> {
    let base = snapshot(store, "base", |fs| {
        std::fs::create_dir_all(fs.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", fs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", fs.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("busybox", fs.join("bin/cat")).unwrap();
        std::os::unix::fs::symlink("busybox", fs.join("bin/ls")).unwrap();
        write(&fs.join("etc/hello"), b"hello v1\n", 0o644);
        write(&fs.join("etc/conf.d/a.conf"), b"a=1\n", 0o600);
        write(&fs.join("data/x"), b"shared inode\n", 0o644);
        std::fs::hard_link(fs.join("data/x"), fs.join("data/x-link")).unwrap();
        write(&fs.join("data/old-in-data"), b"hidden by opaque\n", 0o644);
        write(&fs.join("old.txt"), b"to be deleted\n", 0o644);
        write(&fs.join("keep/k"), b"kept\n", 0o640);
        set_xattr(&fs.join("keep/k"), "user.kiln-test", b"value");
        write(&fs.join("sbin/su-ish"), b"#!/bin/sh\n", 0o755);
        chown(&fs.join("sbin/su-ish"), 1000, 1000);
        // After chown, which clears setuid.
        std::fs::set_permissions(fs.join("sbin/su-ish"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        chown(&fs.join("keep"), 1000, 1001);
    });
    let upper = snapshot(store, "upper", |fs| {
        whiteout(&fs.join("old.txt"));
        std::fs::create_dir(fs.join("data")).unwrap();
        set_xattr(&fs.join("data"), "trusted.overlay.opaque", b"y");
        write(&fs.join("data/new"), b"after opaque\n", 0o644);
        write(&fs.join("etc/hello"), b"hello v2\n", 0o644);
        write(&fs.join(LONG_DIR).join("file-with-a-long-name.txt"), b"long\n", 0o644);
    });
    let empty = snapshot(store, "empty", |_| {});
    vec![base, upper, empty]
}

pub fn history(created_by: &str, empty: bool) -> History {
    let mut b = HistoryBuilder::default().created_by(created_by);
    if empty {
        b = b.empty_layer(true);
    }
    b.build().unwrap()
}

pub fn spec(layers: Vec<String>) -> ImageSpec {
    ImageSpec {
        layers,
        config: serde_json::json!({
            "Env": ["PATH=/bin:/sbin"],
            "Cmd": ["/bin/sh", "-c", "cat /etc/hello; ls /data"],
        }),
        history: vec![
            history("COPY busybox /", false),
            history("ENV PATH=/bin:/sbin", true),
            history("RUN change things", false),
            history("RUN true", false),
        ],
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
        created: None,
    }
}

/// What a tree comparison looks at for one path.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    link: Option<PathBuf>,
    content: Option<Vec<u8>>,
}

/// Relative path → node, for everything under `root`.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_char_device() {
                "char"
            } else {
                "other"
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                Node {
                    kind,
                    mode: if ft.is_symlink() { 0 } else { m.mode() & 0o7777 },
                    uid: m.uid(),
                    gid: m.gid(),
                    link: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap()),
                    content: ft.is_file().then(|| std::fs::read(&p).unwrap()),
                },
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Run a command; return stdout, panicking with stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stdout).unwrap()
}

/// Whether tool `name` is installed; prints the skip line if not.
pub fn have(name: &str, test: &str) -> bool {
    let ok = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipped: {test} because {name} is not installed");
    }
    ok
}

/// One tar entry: (path, type byte, link name, PAX records).
pub type TarEntry = (String, u8, Option<String>, Vec<(String, Vec<u8>)>);

/// Entries of a (possibly compressed) layer blob.
pub fn layer_entries(blob: &[u8]) -> Vec<TarEntry> {
    let raw = if blob.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(blob), &mut v).unwrap();
        v
    } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::decode_all(blob).unwrap()
    } else {
        blob.to_vec()
    };
    let mut archive = tar::Archive::new(&raw[..]);
    let mut out = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let kind = e.header().entry_type().as_byte();
        let link = e.link_name_bytes().map(|l| String::from_utf8(l.to_vec()).unwrap());
        let pax = match e.pax_extensions().unwrap() {
            Some(exts) => exts.map(|x| x.unwrap()).map(|x| (x.key().unwrap().to_string(), x.value_bytes().to_vec())).collect(),
            None => Vec::new(),
        };
        out.push((path, kind, link, pax));
    }
    out
}

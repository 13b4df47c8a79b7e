//! Layer unpacking: overlay-format conversion and metadata on a well-formed
//! layer, and a corpus of malicious tarballs that must all be refused
//! without touching anything outside the target.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_engine::unpack::{UnpackError, unpack};
use sha2::Digest;

/// Builds tarballs byte by byte, including names `tar::Builder` refuses.
struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    fn new() -> Self {
        TarBuilder { builder: tar::Builder::new(Vec::new()) }
    }

    fn header(path: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        assert!(path.len() <= 100, "use long_name for long paths");
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_with(path, data, 0o644, 0, 0, 1_600_000_000)
    }

    fn file_with(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64, mtime: u64) -> &mut Self {
        let mut h = Self::header(path.as_bytes(), tar::EntryType::Regular, data.len() as u64, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32, mtime: u64) -> &mut Self {
        let mut h = Self::header(path.as_bytes(), tar::EntryType::Directory, 0, mode);
        h.set_mtime(mtime);
        h.set_cksum();
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(path.as_bytes(), kind, 0, 0o777);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn device(&mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(path.as_bytes(), kind, 0, 0o666);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v))).unwrap();
        self
    }

    /// A GNU long-name record followed by a file entry.
    fn long_name_file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let mut name = path.as_bytes().to_vec();
        name.push(0);
        let mut h = Self::header(b"././@LongLink", tar::EntryType::GNULongName, name.len() as u64, 0o644);
        h.set_cksum();
        self.builder.append(&h, &name[..]).unwrap();
        let mut h = Self::header(b"placeholder", tar::EntryType::Regular, data.len() as u64, 0o644);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn well_formed_layer() -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.dir("etc/", 0o755, 1000)
        .pax(&[("SCHILY.xattr.user.kiln", b"hello"), ("uid", b"4242")])
        .file_with("etc/hosts", b"127.0.0.1 localhost\n", 0o640, 1000, 1001, 12345)
        .file_with("bin/busybox", b"\x7fELF fake", 0o4755, 0, 0, 777)
        .link(tar::EntryType::Symlink, "bin/sh", "busybox")
        .link(tar::EntryType::Link, "bin/ls", "bin/busybox")
        .device(tar::EntryType::Char, "dev/null", 1, 3)
        .device(tar::EntryType::Fifo, "run/fifo", 0, 0)
        .file(".wh.removed-at-root", b"")
        .file("var/.wh.gone", b"")
        .dir("opq/", 0o755, 1000)
        .file("opq/.wh..wh..opq", b"")
        .file("opq/kept", b"k")
        .file("replaced", b"first")
        .file("replaced", b"second")
        .dir("./", 0o755, 1);
    t.finish()
}

fn check_well_formed(root: &Path) {
    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    let hosts = meta("etc/hosts");
    assert_eq!(std::fs::read(root.join("etc/hosts")).unwrap(), b"127.0.0.1 localhost\n");
    assert_eq!((hosts.uid(), hosts.gid()), (4242, 1001), "PAX uid overrides the header");
    assert_eq!(hosts.permissions().mode() & 0o7777, 0o640);
    assert_eq!(hosts.mtime(), 12345);
    assert_eq!(xattr(&root.join("etc/hosts"), "user.kiln").as_deref(), Some(&b"hello"[..]));
    assert_eq!(meta("etc").mtime(), 1000, "directory mtime is set after its children");
    assert_eq!(meta("bin/busybox").permissions().mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), PathBuf::from("busybox"));
    assert_eq!(meta("bin/ls").ino(), meta("bin/busybox").ino(), "hardlink shares the inode");
    let null = meta("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(meta("run/fifo").file_type().is_fifo());
    for whiteout in ["removed-at-root", "var/gone"] {
        let w = meta(whiteout);
        assert!(w.file_type().is_char_device() && w.rdev() == 0, "{whiteout} is a 0/0 whiteout");
    }
    assert!(!root.join("var/.wh.gone").exists());
    assert_eq!(xattr(&root.join("opq"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert!(!root.join("opq/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(root.join("opq/kept")).unwrap(), b"k");
    assert_eq!(std::fs::read(root.join("replaced")).unwrap(), b"second");
}

fn xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let k = std::ffi::CString::new(key).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

#[test]
fn well_formed_layer_in_every_compression() {
    let tar = well_formed_layer();
    let diff_id = sha256(&tar);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (label, blob) in [("plain", &tar), ("gzip", &gz), ("zstd", &zst)] {
        let dir = tempfile::tempdir().unwrap();
        let summary = unpack(&blob[..], dir.path()).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(summary.diff_id, diff_id, "{label}: diff ID is the digest of the uncompressed tar");
        assert_eq!(summary.entries, 15, "{label}");
        check_well_formed(dir.path());
    }
}

/// Each case: a name, the tarball, and the entry the error must name.
fn malicious_corpus(outside: &Path) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let out = outside.to_str().unwrap().to_string();
    let canary = format!("{out}/canary");
    let leak: &'static str = Box::leak(format!("{out}/leak").into_boxed_str());
    let mut cases = Vec::new();
    let mut add = |name, build: &dyn Fn(&mut TarBuilder), entry| {
        let mut t = TarBuilder::new();
        build(&mut t);
        cases.push((name, t.finish(), entry));
    };
    add(
        "dotdot file",
        &|t| {
            t.file("../leak", b"x");
        },
        "../leak",
    );
    add(
        "dotdot in the middle",
        &|t| {
            t.file("a/../../leak", b"x");
        },
        "a/../../leak",
    );
    add(
        "absolute path",
        &|t| {
            t.file(leak, b"x");
        },
        leak,
    );
    add(
        "absolute symlink then write through",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).file("esc/leak", b"x");
        },
        "esc/leak",
    );
    add(
        "relative symlink then write through",
        &|t| {
            t.dir("d/", 0o755, 0).link(tar::EntryType::Symlink, "d/up", "../../..").file("d/up/leak", b"x");
        },
        "d/up/leak",
    );
    add(
        "symlink then directory through it",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).dir("esc/sub/", 0o755, 0);
        },
        "esc/sub/",
    );
    add(
        "symlink then hardlink through it",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).link(tar::EntryType::Link, "stolen", "esc/canary");
        },
        "stolen",
    );
    add(
        "hardlink with dotdot",
        &|t| {
            t.link(tar::EntryType::Link, "h", "../outside/canary");
        },
        "h",
    );
    add(
        "hardlink to absolute path",
        &|t| {
            t.link(tar::EntryType::Link, "h", &canary);
        },
        "h",
    );
    add(
        "symlink then whiteout through it",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).file("esc/.wh.canary", b"");
        },
        "esc/.wh.canary",
    );
    add(
        "symlink then opaque marker through it",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).file("esc/.wh..wh..opq", b"");
        },
        "esc/.wh..wh..opq",
    );
    add(
        "whiteout of dotdot",
        &|t| {
            t.file(".wh...", b"");
        },
        ".wh...",
    );
    add(
        "PAX path with dotdot",
        &|t| {
            t.pax(&[("path", b"../leak")]).file("innocent", b"x");
        },
        "../leak",
    );
    add(
        "GNU long name with dotdot",
        &|t| {
            t.long_name_file("../leak", b"x");
        },
        "../leak",
    );
    add(
        "device node through symlink",
        &|t| {
            t.link(tar::EntryType::Symlink, "esc", &out).device(tar::EntryType::Char, "esc/null", 1, 3);
        },
        "esc/null",
    );
    cases
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn malicious_tarballs_are_refused_and_nothing_outside_changes() {
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("canary"), b"canary").unwrap();
    std::fs::set_permissions(outside.join("canary"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = (listing(&outside), listing(base.path()));
    let canary_ino = std::fs::metadata(outside.join("canary")).unwrap().ino();

    let corpus = malicious_corpus(&outside);
    assert!(corpus.len() >= 15);
    for (name, tarball, entry) in corpus {
        let target = base.path().join("target");
        std::fs::create_dir(&target).unwrap();
        match unpack(&tarball[..], &target) {
            Err(UnpackError::Unsafe { entry: e, reason }) => {
                assert_eq!(e, entry, "{name}: the error names the offending entry ({reason})");
                eprintln!("{name}: refused {e:?}: {reason}");
            }
            other => panic!("{name}: expected an unsafe-entry error, got {other:?}"),
        }
        assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"canary", "{name}: canary content");
        let canary = std::fs::metadata(outside.join("canary")).unwrap();
        assert_eq!(canary.permissions().mode() & 0o7777, 0o644, "{name}: canary mode");
        assert_eq!(canary.nlink(), 1, "{name}: no hardlink to the canary");
        assert_eq!(canary.ino(), canary_ino, "{name}: canary replaced");
        std::fs::remove_dir_all(&target).unwrap();
        assert_eq!((listing(&outside), listing(base.path())), before, "{name}: nothing new outside");
    }
}

#[test]
fn corrupt_streams_are_read_errors() {
    let dir = tempfile::tempdir().unwrap();
    // gzip magic followed by garbage.
    let err = unpack(&[0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8][..], dir.path()).unwrap_err();
    assert!(matches!(err, UnpackError::Read(_)), "{err}");
    // A truncated tar: a header announcing more data than follows.
    let mut tar = well_formed_layer();
    tar.truncate(700);
    assert!(unpack(&tar[..], dir.path()).is_err());
}

#[test]
fn layer_snapshots_are_keyed_by_diff_id_and_shared() {
    use kiln_cache::snapshots::BlobRecord;
    use kiln_engine::unpack::unpack_layer_snapshot;
    let root = tempfile::tempdir().unwrap();
    let store = kiln_cache::Store::open(root.path()).unwrap();
    let tar = well_formed_layer();
    let diff_id = sha256(&tar);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let plain = BlobRecord {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: store.content.put_bytes(&tar, None).unwrap(),
        size: tar.len() as u64,
    };
    let gzipped = BlobRecord {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: store.content.put_bytes(&gz, None).unwrap(),
        size: gz.len() as u64,
    };
    // Unknown diff ID (e.g. import): learned while unpacking.
    let id = unpack_layer_snapshot(&store, &plain, None).unwrap();
    assert_eq!(id, format!("sha256-{}", diff_id.trim_start_matches("sha256:")));
    check_well_formed(&store.snapshots.path(&id));
    // The gzip form of the same layer is the same snapshot, unpacked once.
    let marker = store.snapshots.path(&id).join("etc/hosts");
    let ino = std::fs::metadata(&marker).unwrap().ino();
    assert_eq!(unpack_layer_snapshot(&store, &gzipped, Some(&diff_id)).unwrap(), id);
    assert_eq!(std::fs::metadata(&marker).unwrap().ino(), ino, "not unpacked again");
    let meta = store.snapshots.meta(&id).unwrap();
    assert_eq!(meta.diff_id.as_deref(), Some(diff_id.as_str()));
    assert_eq!(meta.blobs.len(), 2, "both compressed forms are remembered");
    // A config that lies about the diff ID is caught.
    let wrong = sha256(b"not this layer");
    let err = unpack_layer_snapshot(&store, &gzipped, Some(&wrong)).unwrap_err();
    assert!(format!("{err:#}").contains("diff ID mismatch"), "{err:#}");
    assert_eq!(store.snapshots.list().unwrap(), vec![id]);
}

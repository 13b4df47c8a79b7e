//! `kiln save`: local images to a docker-archive or an OCI layout, checked
//! with skopeo and by loading them back into another root.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn rootfs_tar(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in [("etc/os-release", &b"NAME=kiln-save\n"[..], 0o644), ("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)] {
        b.append(&regular_file_header(name, data.len() as u64, mode), data).unwrap();
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

fn config_id(root: &Path, name: &str) -> String {
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root, &["inspect", name])).unwrap();
    inspect[0]["Id"].as_str().unwrap_or_else(|| panic!("no Id in {inspect}")).to_string()
}

#[test]
fn save_docker_and_oci_then_load_back() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball);
    kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "saveme:1"]);
    let id = config_id(root.path(), "saveme:1");

    let archive = work.path().join("saveme.tar");
    let out = kiln_ok(root.path(), &["save", "-o", archive.to_str().unwrap(), "saveme:1"]);
    assert!(out.contains("saved 1 image(s)"), "{out}");
    let layout = work.path().join("layout");
    kiln_ok(root.path(), &["save", "--format", "oci", "-o", layout.to_str().unwrap(), "saveme:1"]);
    let layout_tar = work.path().join("layout.tar");
    kiln_ok(root.path(), &["save", "--format", "oci", "-o", layout_tar.to_str().unwrap(), "saveme:1"]);
    assert!(layout.join("index.json").is_file() && layout_tar.is_file());

    if have("skopeo", "skopeo inspect of kiln save output") {
        for target in [format!("docker-archive:{}", archive.display()), format!("oci:{}:1", layout.display())] {
            let out = Command::new("skopeo").arg("inspect").arg(&target).output().unwrap();
            assert!(out.status.success(), "skopeo inspect {target}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    // Loaded into an empty root, each gives the very same image.
    for input in [&archive, &layout, &layout_tar] {
        let other = tempfile::tempdir().unwrap();
        kiln_ok(other.path(), &["load", "-i", input.to_str().unwrap(), "-t", "saveme:1"]);
        assert_eq!(config_id(other.path(), "saveme:1"), id, "from {}", input.display());
    }
}

#[test]
fn save_errors_are_clear_and_leave_nothing() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball);
    kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "saveme:1"]);

    let dest = work.path().join("out.tar");
    let err = kiln_err(root.path(), &["save", "-o", dest.to_str().unwrap(), "saveme:1", "nosuch:image"]);
    assert!(err.contains("nosuch"), "{err}");
    assert!(!dest.exists());

    std::fs::write(&dest, b"keep me").unwrap();
    let err = kiln_err(root.path(), &["save", "-o", dest.to_str().unwrap(), "saveme:1"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"keep me");

    let err = kiln_err(root.path(), &["save", "-o", "/proc/kiln-save.tar", "saveme:1"]);
    assert!(err.contains("cannot write /proc/kiln-save.tar"), "{err}");
    let err = kiln_err(root.path(), &["save", "--format", "zip", "-o", "x", "saveme:1"]);
    assert!(err.contains("zip"), "{err}");
    // Only what the test itself made is in the work dir.
    assert_eq!(tree(work.path()), ["out.tar", "rootfs.tar"]);
}

/// `kiln save` without `-o` and `kiln build -o -` write to standard output
/// (as `docker save` and buildx do); messages stay on stderr.
#[test]
fn save_and_build_write_archives_to_stdout() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball);
    kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "saveme:1"]);

    let entries = |bytes: &[u8]| -> Vec<String> {
        let mut archive = tar::Archive::new(bytes);
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect()
    };
    let saved = kiln(root.path(), &["save", "saveme:1"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    assert!(entries(&saved.stdout).contains(&"manifest.json".to_string()), "{:?}", entries(&saved.stdout));
    assert!(String::from_utf8_lossy(&saved.stderr).contains("saved 1 image(s) to -"));
    // What went to stdout loads back as the same image.
    let archive = work.path().join("from-stdout.tar");
    std::fs::write(&archive, &saved.stdout).unwrap();
    let other = tempfile::tempdir().unwrap();
    kiln_ok(other.path(), &["load", "-i", archive.to_str().unwrap(), "-t", "saveme:1"]);
    assert_eq!(config_id(other.path(), "saveme:1"), config_id(root.path(), "saveme:1"));

    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM saveme:1\nCOPY hello.txt /hello.txt\n").unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello from stdout\n").unwrap();
    for spec in ["-", "type=tar,dest=-", "type=oci,dest=-", "type=docker,dest=-"] {
        let out = kiln(root.path(), &["build", "--progress", "plain", "-o", spec, ctx.to_str().unwrap()]);
        assert!(out.status.success(), "-o {spec}: {}", String::from_utf8_lossy(&out.stderr));
        let names = entries(&out.stdout);
        let want = if spec.contains("oci") { "index.json" } else if spec.contains("docker") { "manifest.json" } else { "hello.txt" };
        assert!(names.iter().any(|n| n.trim_start_matches("./") == want), "-o {spec}: {names:?}");
    }
    let err = kiln_err(root.path(), &["build", "-o", "type=local,dest=-", ctx.to_str().unwrap()]);
    assert!(err.contains("needs type=tar, oci or docker"), "{err}");
}

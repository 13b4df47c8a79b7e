//! Getting images in without a registry (`kiln import`, `kiln load`), the
//! local image commands, and the solver's `ImageSource` preferring local
//! images.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use kiln_solver::ImageSource;

fn rootfs_tar(path: &Path, evil: bool) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        b.append(&regular_file_header(name, data.len() as u64, mode), data).unwrap();
    };
    add("etc/os-release", b"NAME=kiln-test\n", 0o644);
    add("bin/hello", b"#!/bin/sh\necho hello\n", 0o755);
    if evil {
        add("../../escape", b"x", 0o644);
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

#[test]
fn import_makes_a_one_layer_image() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball, false);
    let out = kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "myroot:1"]);
    assert!(out.starts_with("myroot:1: imported sha256:"), "{out}");
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root.path(), &["inspect", "myroot:1"])).unwrap();
    let layers = inspect[0]["RootFS"]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    // The diff ID of an uncompressed import is the tarball's own digest.
    assert_eq!(layers[0], sha256(&std::fs::read(&tarball).unwrap()).as_str());
    let snap = root.path().join("snapshots").join(layers[0].as_str().unwrap().replace(':', "-")).join("fs");
    assert_eq!(std::fs::read(snap.join("etc/os-release")).unwrap(), b"NAME=kiln-test\n");
    assert_eq!(inspect[0]["RepoTags"][0], "myroot:1");

    // A tarball that escapes is refused, names the entry, and records nothing.
    let evil = work.path().join("evil.tar");
    rootfs_tar(&evil, true);
    let err = kiln_err(root.path(), &["import", evil.to_str().unwrap(), "evil"]);
    assert!(err.contains("../../escape"), "{err}");
    let images = kiln_ok(root.path(), &["images"]);
    assert!(!images.contains("evil"), "{images}");
}

#[test]
fn tag_rmi_and_lookup_by_id() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball, false);
    kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "base"]);
    kiln_ok(root.path(), &["tag", "base", "127.0.0.1:5000/team/base:v2"]);
    let ids = kiln_ok(root.path(), &["images", "-q"]);
    assert_eq!(ids.lines().count(), 1, "two names, one image: {ids}");
    let id = ids.trim().to_string();
    let listing = kiln_ok(root.path(), &["images"]);
    assert!(listing.contains("127.0.0.1:5000/team/base") && listing.contains("v2"), "{listing}");

    // Inspect by short ID; rmi of one name keeps the other.
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root.path(), &["inspect", &id])).unwrap();
    assert_eq!(inspect[0]["RepoTags"].as_array().unwrap().len(), 2);
    assert_eq!(kiln_ok(root.path(), &["rmi", "base"]).trim(), "Untagged: base:latest");
    assert_eq!(kiln_ok(root.path(), &["images", "-q"]).trim(), id);
    // rmi by ID removes every remaining name.
    kiln_ok(root.path(), &["rmi", &id]);
    assert!(kiln_ok(root.path(), &["images", "-q"]).is_empty());
    let err = kiln_err(root.path(), &["rmi", "base"]);
    assert!(err.contains("no such image"), "{err}");
    let err = kiln_err(root.path(), &["inspect", "nothere"]);
    assert!(err.contains("no such image: nothere"), "{err}");
}

#[test]
fn load_oci_layouts_and_docker_archives() {
    if !have("skopeo", "load_oci_layouts_and_docker_archives") {
        return;
    }
    let layout = busybox_layout();
    let digest = busybox_manifest_digest();
    let work = tempfile::tempdir().unwrap();

    // OCI layout directory: tagged only `latest`, so a name is needed.
    let root = tempfile::tempdir().unwrap();
    let err = kiln_err(root.path(), &["load", "-i", layout.to_str().unwrap()]);
    assert!(err.contains("--tag"), "{err}");
    let out = kiln_ok(root.path(), &["load", "-i", layout.to_str().unwrap(), "--tag", "bb:oci"]);
    assert!(out.contains("Loaded image: bb:oci"), "{out}");
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root.path(), &["inspect", "bb:oci"])).unwrap();
    assert_eq!(inspect[0]["Descriptor"]["digest"], digest.as_str());
    let diff_id = inspect[0]["RootFS"]["Layers"][0].as_str().unwrap().to_string();
    let snap = root.path().join("snapshots").join(diff_id.replace(':', "-")).join("fs");
    assert!(snap.join("bin/busybox").is_file(), "layers are unpacked on load");

    // The same layout as a tar.
    let layout_tar = work.path().join("layout.tar");
    let st =
        std::process::Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&layout_tar).arg(".").status().unwrap();
    assert!(st.success());
    let root2 = tempfile::tempdir().unwrap();
    kiln_ok(root2.path(), &["load", "-i", layout_tar.to_str().unwrap(), "-t", "bb:tar"]);
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root2.path(), &["inspect", "bb:tar"])).unwrap();
    assert_eq!(inspect[0]["Descriptor"]["digest"], digest.as_str());

    // A docker-archive written by skopeo.
    let archive = work.path().join("docker.tar");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker-archive:{}:bb:docker", archive.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let root3 = tempfile::tempdir().unwrap();
    let out = kiln_ok(root3.path(), &["load", "-i", archive.to_str().unwrap()]);
    assert!(out.contains("Loaded image: bb:docker"), "{out}");
    let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root3.path(), &["inspect", "bb:docker"])).unwrap();
    assert_eq!(inspect[0]["RootFS"]["Layers"][0], diff_id.as_str(), "same layer content as the OCI layout");
    assert!(root3.path().join("snapshots").join(diff_id.replace(':', "-")).join("fs/bin/busybox").is_file());

    // Garbage is refused clearly.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"definitely not a tar archive, just some bytes").unwrap();
    let err = kiln_err(root3.path(), &["load", "-i", junk.to_str().unwrap()]);
    assert!(err.contains("junk.tar"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_source_prefers_local_images_then_pulls() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    rootfs_tar(&tarball, false);
    kiln_ok(root.path(), &["import", tarball.to_str().unwrap(), "local/base:1"]);

    let store = Arc::new(kiln_cache::Store::open(root.path()).unwrap());
    // No mirrors and nothing reachable: a local image must not need a registry.
    let offline = Arc::new(kiln_engine::registry::Registry::new(Default::default()));
    let source = kiln_engine::image_source::StoreImageSource::new(store.clone(), offline);
    let platform = kiln_frontend::Platform::default();
    let resolved = source.resolve("local/base:1", &platform).await.unwrap();
    assert_eq!(resolved.layers.len(), 1);
    assert!(store.snapshots.path(&resolved.layers[0]).join("bin/hello").is_file());
    let record = store.images.resolve("local/base:1").unwrap();
    assert_eq!(resolved.manifest_digest, record.target.digest);
    let config: serde_json::Value = serde_json::from_slice(&resolved.config).unwrap();
    assert_eq!(config["os"], "linux");
    // Another platform is not served from the local amd64 image.
    let arm = kiln_frontend::Platform { os: "linux".into(), architecture: "arm64".into(), variant: String::new() };
    assert!(kiln_engine::image_source::resolve_local(&store, "local/base:1", Some(&arm)).unwrap().is_none());

    if !have("docker-registry", "image_source_prefers_local_images_then_pulls (pull part)")
        || !have("skopeo", "image_source_prefers_local_images_then_pulls (pull part)")
    {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let config = kiln_engine::registry::RegistryConfig {
        mirrors: vec![("docker.io".into(), format!("http://{}", reg.addr))],
        ..Default::default()
    };
    let registry = Arc::new(kiln_engine::registry::Registry::new(config));
    let source = kiln_engine::image_source::StoreImageSource::new(store.clone(), registry);
    let pulled = source.resolve("busybox", &platform).await.unwrap();
    assert_eq!(pulled.layers.len(), 1);
    assert!(store.snapshots.path(&pulled.layers[0]).join("bin/busybox").is_file());
    // Now local: resolving again works with the registry gone.
    drop(reg);
    let again = source.resolve("busybox", &platform).await.unwrap();
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
}

#[test]
fn kill_9_mid_import_leaves_nothing_the_next_start_keeps() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("slow.tar");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root.path())
        .args(["import", fifo.to_str().unwrap(), "never:1"])
        .spawn()
        .unwrap();
    // Feed half a layer, then kill kiln while it waits for the rest.
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    std::io::Write::write_all(&mut writer, &vec![0u8; 300_000]).unwrap();
    let ingest = root.path().join("tmp/ingest");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tree(&ingest).is_empty() {
        assert!(std::time::Instant::now() < deadline, "kiln never started writing the blob");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    drop(writer);
    assert_eq!(tree(&ingest).len(), 1, "the dead process left its partial blob");

    // The next kiln start removes it; nothing was named or stored.
    assert!(kiln_ok(root.path(), &["images", "-q"]).is_empty());
    assert!(tree(&ingest).is_empty(), "partial blob removed at the next start");
    assert!(tree(&root.path().join("blobs/sha256")).is_empty());
}

/// `kiln images | head -1`: stdout closed early must end kiln quietly (as
/// SIGPIPE ends other CLIs), not with a "broken pipe" panic.
#[test]
fn images_into_a_closed_pipe_exits_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (read, write) = nix::unistd::pipe().unwrap();
    // The reader is gone before kiln writes anything: every write is EPIPE.
    drop(read);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("images")
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "kiln panicked on a closed pipe:\n{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "unexpected status {:?}:\n{stderr}",
        out.status
    );
}

//! Outputs checked with tools no one here wrote: skopeo, umoci, runc,
//! podman. Needs root (whiteouts are device nodes, opaque dirs use
//! trusted.* xattrs).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;
use kiln_cache::Store;
use kiln_exporter::{Output, export, read_blob};
use oci_spec::image::{ImageConfiguration, ImageManifest};

fn root_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("skipped: {test} because it needs root");
    }
    root
}

fn manifest_of(store: &Store, built: &kiln_exporter::BuiltImage) -> ImageManifest {
    ImageManifest::from_reader(&read_blob(&store.content, built.manifest.digest().as_ref()).unwrap()[..]).unwrap()
}

#[test]
fn oci_layout_passes_skopeo_and_umoci_unpacks_the_same_rootfs_as_type_local() {
    if !root_or_skip("oci layout interop") || !have("skopeo", "oci layout interop") || !have("umoci", "oci layout interop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    for compression in ["gzip", "zstd", "uncompressed"] {
        let layout = tmp.path().join(format!("layout-{compression}"));
        let out = Output::parse(&format!("type=oci,dest={},tar=false,name=kiln-test:v1,compression={compression}", layout.display())).unwrap();
        let built = export(&store, &spec, &out, None).unwrap().unwrap();

        // The empty third layer is dropped; its history entry says so.
        let manifest = manifest_of(&store, &built);
        assert_eq!(manifest.layers().len(), 2);
        let config = ImageConfiguration::from_reader(&read_blob(&store.content, built.config.digest().as_ref()).unwrap()[..]).unwrap();
        assert_eq!(config.rootfs().diff_ids().len(), 2);
        let empties: Vec<bool> = config.history().as_ref().unwrap().iter().map(|h| h.empty_layer() == Some(true)).collect();
        assert_eq!(empties, [false, true, false, true]);

        let inspect = run(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:v1", layout.display())));
        let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2, "{inspect}");
        assert_eq!(inspect["Os"], "linux");

        let bundle = tmp.path().join(format!("bundle-{compression}"));
        run(Command::new("umoci").arg("unpack").arg("--image").arg(format!("{}:v1", layout.display())).arg(&bundle));
        let local = tmp.path().join(format!("local-{compression}"));
        export(&store, &spec, &Output::parse(&format!("type=local,dest={}", local.display())).unwrap(), None).unwrap();

        let got = tree(&local);
        assert_eq!(got, tree(&bundle.join("rootfs")), "type=local and umoci unpack differ ({compression})");
        // And the tree is the right one: whiteout and opaque dir applied.
        assert!(!local.join("old.txt").exists());
        assert!(!local.join("data/x").exists() && !local.join("data/old-in-data").exists());
        assert_eq!(std::fs::read(local.join("data/new")).unwrap(), b"after opaque\n");
        assert_eq!(std::fs::read(local.join("etc/hello")).unwrap(), b"hello v2\n");
        assert_eq!(std::fs::read_link(local.join("bin/sh")).unwrap(), Path::new("busybox"));
        let su = std::fs::metadata(local.join("sbin/su-ish")).unwrap();
        assert_eq!((su.mode() & 0o7777, su.uid(), su.gid()), (0o4755, 1000, 1000));
        assert!(local.join(LONG_DIR).join("file-with-a-long-name.txt").is_file());
    }
}

#[test]
fn layer_tars_have_whiteouts_opaque_markers_hardlinks_xattrs_in_sorted_order() {
    if !root_or_skip("layer tar contents") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let spec = spec(chain(&store));
    let built = export(&store, &spec, &Output::parse("type=image,name=x").unwrap(), None).unwrap().unwrap();
    let manifest = manifest_of(&store, &built);
    let base = layer_entries(&read_blob(&store.content, manifest.layers()[0].digest().as_ref()).unwrap());
    let upper = layer_entries(&read_blob(&store.content, manifest.layers()[1].digest().as_ref()).unwrap());

    let names: Vec<&str> = base.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names[..3], ["bin/", "bin/busybox", "bin/cat"]);
    let link = base.iter().find(|e| e.0 == "data/x-link").unwrap();
    assert_eq!((link.1, link.2.as_deref()), (b'1', Some("data/x")), "second name of an inode is a hardlink");
    let k = base.iter().find(|e| e.0 == "keep/k").unwrap();
    assert!(k.3.iter().any(|(key, v)| key == "SCHILY.xattr.user.kiln-test" && v == b"value"), "{:?}", k.3);

    let names: Vec<&str> = upper.iter().map(|e| e.0.as_str()).collect();
    assert!(names.contains(&".wh.old.txt"), "{names:?}");
    let opq = names.iter().position(|n| *n == "data/.wh..wh..opq").expect("opaque marker");
    assert_eq!(names[opq - 1], "data/", "marker right after its directory");
    assert!(names.contains(&format!("{LONG_DIR}/file-with-a-long-name.txt").as_str()), "long path via PAX: {names:?}");
    let data = upper.iter().find(|e| e.0 == "data/").unwrap();
    assert!(data.3.iter().all(|(k, _)| !k.contains("overlay")), "overlay xattrs must not leak: {:?}", data.3);
    // No character devices: whiteouts are converted.
    assert!(upper.iter().all(|e| e.1 != b'3'));

    // Depth-first, names sorted: the base layer (no markers) is in order.
    let names: Vec<&str> = base.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| a.trim_end_matches('/').split('/').cmp(b.trim_end_matches('/').split('/')));
    assert_eq!(names, sorted);
}

#[test]
fn docker_archive_passes_skopeo_and_podman_load_runs_it() {
    if !root_or_skip("docker archive interop") || !have("skopeo", "docker archive interop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    let archive = tmp.path().join("image.tar");
    let out = Output::parse(&format!("type=docker,dest={},name=kiln-interop/archive:v2", archive.display())).unwrap();
    export(&store, &spec, &out, None).unwrap();

    let inspect = run(Command::new("skopeo").arg("inspect").arg(format!("docker-archive:{}", archive.display())));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2, "{inspect}");
    // A full copy checks every layer against its diff ID.
    let copied = tmp.path().join("copied");
    run(Command::new("skopeo").arg("copy").arg(format!("docker-archive:{}", archive.display())).arg(format!("oci:{}:c", copied.display())));

    let mut listing: Vec<String> = tar::Archive::new(std::fs::File::open(&archive).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert!(listing.contains(&"manifest.json".to_string()) && listing.contains(&"repositories".to_string()));

    if !have("podman", "podman load of the docker archive") {
        return;
    }
    let out = Command::new("podman").arg("load").arg("-i").arg(&archive).output().unwrap();
    if !out.status.success() {
        // podman needs a working storage setup; say why we could not check.
        println!("skipped: podman load because podman failed: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    // Explicit, low rlimits: podman's defaults exceed this sandbox's hard
    // limits and runc may not raise them.
    let ran = Command::new("podman")
        .args(["run", "--rm", "--network=none", "--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"])
        .arg("kiln-interop/archive:v2")
        .output()
        .unwrap();
    let _ = Command::new("podman").args(["rmi", "-f", "kiln-interop/archive:v2"]).output();
    assert!(ran.status.success(), "podman run: {}", String::from_utf8_lossy(&ran.stderr));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello v2\nnew\n");
}

#[test]
fn runc_runs_the_umoci_bundle() {
    if !root_or_skip("runc run") || !have("umoci", "runc run") || !have("runc", "runc run") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    let layout = tmp.path().join("layout.tar");
    export(&store, &spec, &Output::parse(&format!("type=oci,dest={},name=run:me", layout.display())).unwrap(), None).unwrap();
    let dir = tmp.path().join("layout");
    std::fs::create_dir(&dir).unwrap();
    run(Command::new("tar").arg("-xf").arg(&layout).arg("-C").arg(&dir));
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci").arg("unpack").arg("--image").arg(format!("{}:me", dir.display())).arg(&bundle));
    // No tty in tests; the rest of umoci's runtime config is used as is.
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let id = format!("kiln-export-test-{}", std::process::id());
    let out = Command::new("runc").arg("run").arg("--bundle").arg(&bundle).arg(&id).output().unwrap();
    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
    assert!(out.status.success(), "runc run: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello v2\nnew\n");
}

#[test]
fn type_tar_holds_the_same_tree_as_type_local() {
    if !root_or_skip("type=tar") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    let fs_tar = tmp.path().join("fs.tar");
    export(&store, &spec, &Output::parse(&format!("type=tar,dest={}", fs_tar.display())).unwrap(), None).unwrap();
    let local = tmp.path().join("local");
    export(&store, &spec, &Output::parse(&format!("type=local,dest={}", local.display())).unwrap(), None).unwrap();
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar").arg("--xattrs").arg("-xpf").arg(&fs_tar).arg("-C").arg(&unpacked));
    assert_eq!(tree(&local), tree(&unpacked));
    let names: Vec<String> = layer_entries(&std::fs::read(&fs_tar).unwrap()).into_iter().map(|e| e.0).collect();
    assert!(names.iter().all(|n| !n.contains(".wh.")), "a final filesystem has no whiteouts: {names:?}");
}

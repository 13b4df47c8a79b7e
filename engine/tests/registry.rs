//! Pull and push against a real registry (docker-registry on loopback),
//! checked with skopeo; the error cases users meet; concurrent pulls.

mod common;

use std::path::Path;

use common::*;

const TEST: &str = "registry tests";

fn mirror_flag(reg: &TestRegistry) -> String {
    format!("docker.io=http://{}", reg.addr)
}

fn only_dirs_empty(root: &Path) {
    for sub in ["tmp/ingest", "tmp/snapshots", "tmp/scratch"] {
        let left = tree(&root.join(sub));
        assert!(left.is_empty(), "{sub} has leftovers: {left:?}");
    }
}

#[test]
fn pull_busybox_through_a_docker_io_mirror() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let root = tempfile::tempdir().unwrap();
    let mirror = mirror_flag(&reg);
    let out = kiln_ok(root.path(), &["--registry-mirror", &mirror, "pull", "busybox"]);
    assert!(out.contains("busybox:latest: pulled sha256:"), "{out}");
    assert!(out.contains("1 downloaded"), "{out}");

    // The layer is unpacked in a snapshot named by its diff ID.
    let snapshots = tree(&root.path().join("snapshots"));
    let snap: Vec<&String> = snapshots.iter().filter(|s| !s.contains('/')).collect();
    assert_eq!(snap.len(), 1, "{snapshots:?}");
    let fs = root.path().join("snapshots").join(snap[0]).join("fs");
    assert!(fs.join("bin/busybox").is_file());
    assert_eq!(std::fs::read_link(fs.join("bin/sh")).unwrap(), Path::new("busybox"));
    assert!(std::fs::read_to_string(fs.join("etc/passwd")).unwrap().starts_with("root:x:0:0"));

    let images = kiln_ok(root.path(), &["images"]);
    assert!(images.lines().any(|l| l.starts_with("busybox ") && l.contains("latest")), "{images}");

    // Pulling again downloads nothing.
    let again = kiln_ok(root.path(), &["--registry-mirror", &mirror, "pull", "busybox:latest"]);
    assert!(again.contains("0 downloaded"), "{again}");
    only_dirs_empty(root.path());
}

#[test]
fn mirror_from_the_config_file() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("config.json"),
        format!(r#"{{"registry-mirrors": {{"docker.io": ["http://{}"]}}}}"#, reg.addr),
    )
    .unwrap();
    let out = kiln_ok(root.path(), &["pull", "library/busybox"]);
    assert!(out.contains("pulled sha256:"), "{out}");
}

#[test]
fn push_then_pull_back_by_digest_and_skopeo_agrees() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::start();
    reg.push_busybox("library/busybox:latest");
    let insecure = reg.addr.as_str();
    let root = tempfile::tempdir().unwrap();
    let source = format!("{}/library/busybox:latest", reg.addr);
    kiln_ok(root.path(), &["--insecure-registry", insecure, "pull", &source]);
    let pushed_ref = format!("{}/kiln/pushed:v1", reg.addr);
    kiln_ok(root.path(), &["tag", &source, &pushed_ref]);
    let out = kiln_ok(root.path(), &["--insecure-registry", insecure, "push", &pushed_ref]);
    let digest = busybox_manifest_digest();
    assert!(out.contains(&format!("digest: {digest}")), "{out}");
    // The blobs came from library/busybox of this registry: mounted, not uploaded.
    assert!(out.contains("0 blob(s) uploaded, 2 mounted, 0 already there"), "{out}");

    // skopeo, not kiln, reads what kiln pushed.
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{pushed_ref}"))
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(json["Digest"], digest.as_str());
    assert_eq!(json["Architecture"], "amd64");
    assert_eq!(json["Layers"].as_array().unwrap().len(), 1);

    // Pushing again uploads nothing.
    let again = kiln_ok(root.path(), &["--insecure-registry", insecure, "push", &pushed_ref]);
    assert!(again.contains("0 blob(s) uploaded, 0 mounted, 2 already there"), "{again}");

    // An image the registry has never seen is uploaded, and skopeo reads it.
    let rootfs = root.path().join("rootfs.tar");
    std::fs::write(&rootfs, layer_tar("imported")).unwrap();
    let local_ref = format!("{}/kiln/imported:v1", reg.addr);
    kiln_ok(root.path(), &["import", rootfs.to_str().unwrap(), &local_ref]);
    let out = kiln_ok(root.path(), &["--insecure-registry", insecure, "push", &local_ref]);
    assert!(out.contains("2 blob(s) uploaded, 0 mounted, 0 already there"), "{out}");
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{local_ref}"))
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let local = kiln_ok(root.path(), &["inspect", &local_ref]);
    let local: serde_json::Value = serde_json::from_str(&local).unwrap();
    assert_eq!(sha256(&inspect.stdout), local[0]["Descriptor"]["digest"].as_str().unwrap(), "same manifest bytes");

    // A fresh store pulls it back by digest.
    let fresh = tempfile::tempdir().unwrap();
    let by_digest = format!("{}/kiln/pushed@{digest}", reg.addr);
    let out = kiln_ok(fresh.path(), &["--insecure-registry", insecure, "pull", &by_digest]);
    assert!(out.contains(&digest), "{out}");
    let inspect = kiln_ok(fresh.path(), &["inspect", &by_digest]);
    let json: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(json[0]["Descriptor"]["digest"], digest.as_str());
    assert_eq!(json[0]["RootFS"]["Layers"].as_array().unwrap().len(), 1);
}

#[test]
fn clear_errors_for_unknown_image_down_registry_and_plain_http() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let root = tempfile::tempdir().unwrap();
    let insecure = reg.addr.as_str();

    let err = kiln_err(root.path(), &["--insecure-registry", insecure, "pull", &format!("{}/no/such:image", reg.addr)]);
    assert!(err.contains("not found"), "{err}");
    let err = kiln_err(root.path(), &["--registry-mirror", &mirror_flag(&reg), "pull", "busybox:no-such-tag"]);
    assert!(err.contains("docker.io/library/busybox:no-such-tag not found"), "{err}");

    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = format!("127.0.0.1:{port}");
    let err = kiln_err(root.path(), &["--insecure-registry", &down, "pull", &format!("{down}/x:1")]);
    assert!(err.contains(&format!("registry {down} is unreachable")), "{err}");

    // Without --insecure-registry kiln speaks HTTPS to it and fails.
    let err = kiln_err(root.path(), &["pull", &format!("{}/library/busybox", reg.addr)]);
    assert!(err.contains("unreachable"), "{err}");

    let err = kiln_err(root.path(), &["pull", "Not A Reference"]);
    assert!(err.contains("invalid image reference"), "{err}");
    assert!(kiln_ok(root.path(), &["images", "-q"]).is_empty(), "no image was recorded");
}

#[test]
fn digest_mismatch_is_refused_and_leaves_nothing() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::start();
    reg.push_busybox("library/busybox:latest");
    // Corrupt the layer in the registry's storage (same length).
    let layout = busybox_layout();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(busybox_manifest_digest().trim_start_matches("sha256:")))
            .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let data = reg.storage().unwrap().join(format!("docker/registry/v2/blobs/sha256/{}/{layer}/data", &layer[..2]));
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let root = tempfile::tempdir().unwrap();
    let err =
        kiln_err(root.path(), &["--insecure-registry", &reg.addr, "pull", &format!("{}/library/busybox", reg.addr)]);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(!root.path().join("blobs/sha256").join(&layer).exists(), "the corrupt layer must not be stored");
    assert!(tree(&root.path().join("snapshots")).is_empty());
    assert!(kiln_ok(root.path(), &["images", "-q"]).is_empty());
    only_dirs_empty(root.path());
}

#[test]
fn bad_manifest_is_reported() {
    if !have("docker-registry", TEST) {
        return;
    }
    let reg = TestRegistry::start();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = reg.put_blob("odd/thing", config);
    let layer_digest = reg.put_blob("odd/thing", b"not really a layer");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/x-kiln-unknown","digest":"{layer_digest}","size":18}}]}}"#,
        config.len()
    );
    reg.put_manifest("odd/thing", "v1", "application/vnd.oci.image.manifest.v1+json", manifest.as_bytes());
    let root = tempfile::tempdir().unwrap();
    let err = kiln_err(root.path(), &["--insecure-registry", &reg.addr, "pull", &format!("{}/odd/thing:v1", reg.addr)]);
    assert!(err.contains("bad manifest") && err.contains("unsupported layer media type"), "{err}");
}

#[test]
fn login_and_unauthorized() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::start_with(Some(BasicAuth { htpasswd_line: TEST_HTPASSWD }));
    let (user, password) = TEST_USER;
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", &format!("{user}:{password}")])
        .arg(format!("oci:{}:latest", busybox_layout().display()))
        .arg(format!("docker://{}/private/bb:latest", reg.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let root = tempfile::tempdir().unwrap();
    let docker_config = tempfile::tempdir().unwrap();
    let image = format!("{}/private/bb:latest", reg.addr);
    let kiln_env = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("DOCKER_CONFIG", docker_config.path())
            .arg("--root")
            .arg(root.path())
            .args(["--insecure-registry", &reg.addr])
            .args(args)
            .output()
            .unwrap()
    };
    let denied = kiln_env(&["pull", &image]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success() && stderr.contains("unauthorized"), "{stderr}");

    let wrong = kiln_env(&["login", "-u", user, "-p", "wrong-password", &reg.addr]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && stderr.contains("unauthorized"), "a wrong password must not log in: {stderr}");
    assert!(!docker_config.path().join("config.json").exists(), "nothing stored for a failed login");

    let ok = kiln_env(&["login", "-u", user, "-p", password, &reg.addr]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let stored = std::fs::read_to_string(docker_config.path().join("config.json")).unwrap();
    assert!(stored.contains(&reg.addr), "{stored}");

    let pulled = kiln_env(&["pull", &image]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
}

#[test]
fn concurrent_pulls_into_one_root() {
    if !have("docker-registry", TEST) || !have("skopeo", TEST) {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let root = tempfile::tempdir().unwrap();
    let mirror = mirror_flag(&reg);
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(root.path())
            .args(["--registry-mirror", &mirror, "pull", "busybox"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children: Vec<_> = (0..3).map(|_| spawn()).collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let snapshots: Vec<String> = std::fs::read_dir(root.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(snapshots.len(), 1, "one shared snapshot: {snapshots:?}");
    assert!(root.path().join("snapshots").join(&snapshots[0]).join("fs/bin/busybox").is_file());
    let blobs = tree(&root.path().join("blobs/sha256"));
    assert_eq!(blobs.len(), 3, "manifest, config, layer: {blobs:?}");
    let images = kiln_ok(root.path(), &["images", "-q"]);
    assert_eq!(images.lines().count(), 1, "{images}");
    only_dirs_empty(root.path());
}

/// A one-file layer tar: `/which` containing `content`.
fn layer_tar(content: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("which").unwrap();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, content.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn docker_manifest_list_platforms_and_layer_compressions() {
    if !have("docker-registry", TEST) {
        return;
    }
    let reg = TestRegistry::start();
    let repo = "multi/arch";
    // amd64: a zstd layer under a Docker schema 2 manifest; arm64: an
    // uncompressed layer under an OCI manifest. Both listed in a Docker
    // manifest list.
    let mut entries = Vec::new();
    for (arch, compression) in [("amd64", "zstd"), ("arm64", "none")] {
        let tar = layer_tar(arch);
        let (blob, layer_type) = match compression {
            "zstd" => (zstd::encode_all(&tar[..], 3).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd"),
            _ => (tar.clone(), "application/vnd.docker.image.rootfs.diff.tar"),
        };
        let layer_digest = reg.put_blob(repo, &blob);
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            sha256(&tar)
        );
        let config_digest = reg.put_blob(repo, config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"{layer_type}","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            blob.len()
        );
        let manifest_digest = sha256(manifest.as_bytes());
        reg.put_manifest(
            repo,
            &manifest_digest,
            "application/vnd.docker.distribution.manifest.v2+json",
            manifest.as_bytes(),
        );
        entries.push(format!(
            r#"{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
            manifest.len()
        ));
    }
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{}]}}"#,
        entries.join(",")
    );
    reg.put_manifest(repo, "v1", "application/vnd.docker.distribution.manifest.list.v2+json", list.as_bytes());

    let image = format!("{}/{repo}:v1", reg.addr);
    for (platform, expect) in [(None, "amd64"), (Some("linux/arm64"), "arm64")] {
        let root = tempfile::tempdir().unwrap();
        let mut args = vec!["--insecure-registry", reg.addr.as_str(), "pull"];
        if let Some(p) = platform {
            args.extend(["--platform", p]);
        }
        args.push(&image);
        kiln_ok(root.path(), &args);
        let inspect: serde_json::Value = serde_json::from_str(&kiln_ok(root.path(), &["inspect", &image])).unwrap();
        assert_eq!(inspect[0]["Architecture"], expect);
        let diff_id = inspect[0]["RootFS"]["Layers"][0].as_str().unwrap().replace(':', "-");
        let which = std::fs::read_to_string(root.path().join("snapshots").join(diff_id).join("fs/which")).unwrap();
        assert_eq!(which, expect);
    }
    let root = tempfile::tempdir().unwrap();
    let err = kiln_err(root.path(), &["--insecure-registry", &reg.addr, "pull", "--platform", "linux/s390x", &image]);
    assert!(err.contains("no image for platform linux/s390x") && err.contains("linux/arm64"), "{err}");
}

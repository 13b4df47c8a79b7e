//! The stock docker CLI (20.10, `/usr/bin/docker` from the `docker.io`
//! package) against `kiln serve`.

mod common;
mod daemon_support;

use std::process::{Command, Output};

use common::{TestRegistry, kiln_ok};
use daemon_support::{Daemon, stderr, stdout};

const DOCKER: &str = "/usr/bin/docker";

fn docker(d: &Daemon, config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(DOCKER)
        .args(args)
        .env("DOCKER_HOST", d.host())
        .env("DOCKER_CONFIG", config)
        .env("DOCKER_BUILDKIT", "0")
        .env_remove("DOCKER_CONTEXT")
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "docker {what} failed ({}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
    stdout(&out)
}

#[test]
fn docker_cli_end_to_end() {
    if !std::path::Path::new(DOCKER).is_file() {
        println!("skipped: docker_cli_end_to_end because {DOCKER} is not installed (apt-get install docker.io)");
        return;
    }
    if !common::have("docker-registry", "docker_cli_end_to_end") || !common::have("skopeo", "docker_cli_end_to_end") {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let mirror = format!("docker.io=http://{}", reg.addr);
    let d = Daemon::start(false, &["--insecure-registry", &reg.addr, "--registry-mirror", &mirror]);
    let config = d.dir.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();

    let version = ok(docker(&d, &config, &["version"]), "version");
    assert!(version.contains("Server: kiln") && version.contains("1.41"), "{version}");

    // `docker run` of an image the daemon lacks: create answers 404, the CLI pulls (through the mirror) and retries.
    let out = docker(&d, &config, &["run", "--rm", "busybox", "echo", "hi"]);
    assert_eq!(stdout(&out), "hi\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    let out = docker(&d, &config, &["run", "--rm", "busybox", "sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("to-stderr"), "{}", stderr(&out));

    let source = format!("{}/library/busybox:latest", reg.addr);
    let pulled = ok(docker(&d, &config, &["pull", &source]), "pull");
    assert!(pulled.contains("Digest: sha256:") && pulled.trim_end().ends_with(&source), "{pulled}");
    let images = ok(docker(&d, &config, &["images"]), "images");
    assert!(images.contains(&format!("{}/library/busybox", reg.addr)) && images.contains("busybox "), "{images}");

    let target = format!("{}/docker/copy:v1", reg.addr);
    ok(docker(&d, &config, &["tag", &source, &target]), "tag");
    let pushed = ok(docker(&d, &config, &["push", &target]), "push");
    assert!(pushed.contains("v1: digest: sha256:"), "{pushed}");
    // The pushed image is really in the registry: an embedded kiln pulls it.
    let other = tempfile::tempdir().unwrap();
    kiln_ok(other.path(), &["--insecure-registry", &reg.addr, "pull", &target]);

    let inspect = ok(docker(&d, &config, &["image", "inspect", &target]), "image inspect");
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert!(v[0]["RepoTags"].as_array().unwrap().iter().any(|t| t.as_str() == Some(target.as_str())), "{inspect}");
    let removed = ok(docker(&d, &config, &["rmi", &target]), "rmi");
    assert!(removed.contains(&format!("Untagged: {target}")), "{removed}");
    let out = docker(&d, &config, &["rmi", &target]);
    assert!(!out.status.success() && stderr(&out).contains("No such image"), "{}", stderr(&out));
}

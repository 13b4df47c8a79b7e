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

/// Whether the docker CLI is there (else test `test` says it is skipped).
fn have_docker(test: &str) -> bool {
    let there = std::path::Path::new(DOCKER).is_file();
    if !there {
        println!("skipped: {test} because {DOCKER} is not installed (apt-get install docker.io)");
    }
    there
}

/// A fresh `DOCKER_CONFIG` directory for the CLI, next to the daemon's log.
fn docker_config(d: &Daemon) -> std::path::PathBuf {
    let config = d.dir.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    config
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "docker {what} failed ({}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
    stdout(&out)
}

#[test]
fn docker_cli_end_to_end() {
    if !have_docker("docker_cli_end_to_end") {
        return;
    }
    if !common::have("docker-registry", "docker_cli_end_to_end") || !common::have("skopeo", "docker_cli_end_to_end") {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let mirror = format!("docker.io=http://{}", reg.addr);
    let d = Daemon::start(false, &["--insecure-registry", &reg.addr, "--registry-mirror", &mirror]);
    let config = docker_config(&d);

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

#[test]
fn docker_logs_of_detached_containers() {
    if !have_docker("docker_logs_of_detached_containers") {
        return;
    }
    let d = Daemon::start(true, &[]);
    let config = docker_config(&d);
    let id = ok(docker(&d, &config, &["run", "-d", "--name", "logged", "busybox", "sh", "-c", "echo one; sleep 0.3; echo two >&2; sleep 0.3; printf 'thr'; sleep 0.2; echo ee"]), "run -d");
    assert_eq!(id.trim().len(), 64, "{id}");
    assert_eq!(ok(docker(&d, &config, &["wait", "logged"]), "wait").trim(), "0");
    let out = docker(&d, &config, &["logs", "logged"]);
    assert_eq!((stdout(&out), stderr(&out)), ("one\nthree\n".to_string(), "two\n".to_string()));
    assert_eq!(out.status.code(), Some(0));
    // --tail counts lines, across both streams (in the order they came:
    // the sleeps above make it certain), and by ID prefix too.
    let out = docker(&d, &config, &["logs", "--tail", "2", &id.trim()[..12]]);
    assert_eq!((stdout(&out), stderr(&out)), ("three\n".to_string(), "two\n".to_string()));
    // -f follows a running container until it exits.
    ok(docker(&d, &config, &["run", "-d", "--name", "follow", "busybox", "sh", "-c", "echo a; sleep 2; echo b; exit 5"]), "run -d");
    let started = std::time::Instant::now();
    let out = docker(&d, &config, &["logs", "-f", "follow"]);
    assert_eq!(stdout(&out), "a\nb\n", "{}", stderr(&out));
    assert!(started.elapsed() >= std::time::Duration::from_millis(1000), "followed until the end: {:?}", started.elapsed());
    assert_eq!(ok(docker(&d, &config, &["wait", "follow"]), "wait").trim(), "5");
    ok(docker(&d, &config, &["rm", "logged"]), "rm");
    let out = docker(&d, &config, &["logs", "logged"]);
    assert!(!out.status.success() && stderr(&out).contains("No such container"), "{}", stderr(&out));
    let (status, _, body) = d.http("GET", &format!("/v1.41/containers/{}/logs", id.trim()), b"");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = d.http("GET", "/v1.41/containers/follow/logs?stdout=1&tail=x", b"");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn docker_run_interactive_and_tty() {
    if !have_docker("docker_run_interactive_and_tty") {
        return;
    }
    let d = Daemon::start(true, &[]);
    let config = docker_config(&d);
    // -i: the CLI's stdin reaches the container; its end closes the container's.
    let mut child = Command::new(DOCKER)
        .args(["run", "-i", "--rm", "busybox", "sh", "-c", "wc -l; echo after-eof"])
        .env("DOCKER_HOST", d.host())
        .env("DOCKER_CONFIG", &config)
        .env_remove("DOCKER_CONTEXT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"a\nb\nc\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "3\nafter-eof\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    if !common::have("script", "docker_run_interactive_and_tty") {
        return;
    }
    // -it under a real terminal: a pty inside, the CLI's size (sent with
    // POST /containers/{id}/resize after start), the exit code.
    let inner = format!(
        "stty rows 33 cols 88; DOCKER_HOST={} DOCKER_CONFIG={} {DOCKER} run -it --rm busybox sh -c 'sleep 1; tty; stty size; exit 9'",
        d.host(),
        config.display()
    );
    let out = Command::new("script").args(["-qec", &inner, "/dev/null"]).stdin(std::process::Stdio::null()).output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("/dev/pts/"), "{text:?} {}", stderr(&out));
    assert!(text.contains("33 88"), "{text:?}");
    assert_eq!(out.status.code(), Some(9), "{text:?}");
}

/// Containers made through the Docker API outlive the daemon: after a
/// restart `docker ps -a` lists them (one that was running when the daemon
/// was killed shows exited, its shim died with the daemon), `inspect` and
/// `logs` answer as before, and `docker rm` removes them for good.
#[test]
fn docker_containers_survive_a_daemon_restart() {
    if !have_docker("docker_containers_survive_a_daemon_restart") {
        return;
    }
    if !common::can_run_containers("docker_containers_survive_a_daemon_restart", &[]) {
        return;
    }
    let mut d = Daemon::start(true, &[]);
    let config = docker_config(&d);
    let out = docker(&d, &config, &["run", "--name", "done", "busybox", "sh", "-c", "echo out; echo err >&2; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    ok(docker(&d, &config, &["create", "--name", "fresh", "busybox", "true"]), "create");
    ok(docker(&d, &config, &["run", "-d", "--name", "long", "busybox", "sleep", "600"]), "run -d");
    let running = ok(docker(&d, &config, &["ps"]), "ps");
    assert!(running.contains("long") && !running.contains("done") && !running.contains("fresh"), "{running}");
    let all = ok(docker(&d, &config, &["ps", "-a"]), "ps -a");
    assert!(all.contains("Exited (4)") && all.contains("Created") && all.contains("Up"), "{all}");

    // Killed, not stopped: nothing gets written on the way out.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    assert!(!d.stop(), "a killed daemon does not exit 0");
    d.restart(&[]);
    let all = ok(docker(&d, &config, &["ps", "-a", "--no-trunc"]), "ps -a after the restart");
    for name in ["done", "fresh", "long"] {
        assert!(all.contains(name), "{name} is gone after the restart:\n{all}");
    }
    assert!(all.contains("Exited (4)") && all.contains("Created") && all.contains("Exited (255)") && !all.contains("Up"), "{all}");
    assert_eq!(ok(docker(&d, &config, &["ps", "-q"]), "ps -q"), "", "nothing runs after a restart");
    let logs = docker(&d, &config, &["logs", "done"]);
    assert_eq!((stdout(&logs).as_str(), stderr(&logs).as_str()), ("out\n", "err\n"));
    let state = ok(docker(&d, &config, &["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "done", "long"]), "inspect");
    assert_eq!(state, "exited 4\nexited 255\n");

    ok(docker(&d, &config, &["rm", "done", "fresh", "long"]), "rm");
    assert!(docker(&d, &config, &["inspect", "done"]).status.code() != Some(0));
    assert!(d.stop());
    d.restart(&[]);
    let all = ok(docker(&d, &config, &["ps", "-a", "-q"]), "ps -a after rm and a restart");
    assert_eq!(all, "", "removed containers stay removed");
}

/// `docker start` of an exited container runs it again, as with dockerd:
/// the same command on the filesystem it left, the log continued, the new
/// exit code; also after a daemon restart, and for one that was running
/// when the daemon died. `docker rm` then removes its filesystem too.
#[test]
fn docker_start_runs_an_exited_container_again_across_a_restart() {
    if !have_docker("docker_start_runs_an_exited_container_again_across_a_restart") {
        return;
    }
    if !common::can_run_containers("docker_start_runs_an_exited_container_again_across_a_restart", &[]) {
        return;
    }
    let mut d = Daemon::start(true, &[]);
    let config = docker_config(&d);
    // Each run appends to a file in the container and prints how many runs it saw.
    let script = "echo run >> /runs; wc -l < /runs; exit 3";
    let first = docker(&d, &config, &["run", "--name", "again", "busybox", "sh", "-c", script]);
    assert_eq!((stdout(&first).trim(), first.status.code()), ("1", Some(3)), "{}", stderr(&first));
    let second = docker(&d, &config, &["start", "-a", "again"]);
    assert_eq!((stdout(&second).trim(), second.status.code()), ("2", Some(3)), "{}", stderr(&second));
    ok(docker(&d, &config, &["run", "-d", "--name", "long", "busybox", "sleep", "600"]), "run -d");

    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    assert!(!d.stop(), "a killed daemon does not exit 0");
    d.restart(&[]);
    let third = docker(&d, &config, &["start", "-a", "again"]);
    assert_eq!((stdout(&third).trim(), third.status.code()), ("3", Some(3)), "{}", stderr(&third));
    // Detached: start, then wait for its exit code.
    ok(docker(&d, &config, &["start", "again"]), "start");
    assert_eq!(ok(docker(&d, &config, &["wait", "again"]), "wait").trim(), "3");
    assert_eq!(ok(docker(&d, &config, &["logs", "again"]), "logs"), "1\n2\n3\n4\n");
    // The one that was running when the daemon died runs again too.
    ok(docker(&d, &config, &["start", "long"]), "start long");
    let running = ok(docker(&d, &config, &["ps"]), "ps");
    assert!(running.contains("long") && !running.contains("again"), "{running}");
    let id = ok(docker(&d, &config, &["inspect", "--format", "{{.Id}}", "again"]), "inspect");
    let fs = d.root.join("daemon/containers").join(format!("{}.fs", id.trim()));
    assert!(fs.join("upper/runs").is_file(), "{} holds the container's changes", fs.display());
    ok(docker(&d, &config, &["rm", "-f", "again", "long"]), "rm -f");
    assert!(!fs.exists(), "{} is left after docker rm", fs.display());
    assert_eq!(ok(docker(&d, &config, &["ps", "-a", "-q"]), "ps -a"), "");
}

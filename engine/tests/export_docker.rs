//! Interop with Docker itself: a docker-archive kiln wrote (`build -o
//! type=docker` and `kiln save`) is loaded by a real dockerd with the stock
//! `docker load`, and the loaded image runs with `docker run`.
//!
//! dockerd runs privately: its own data root, exec root and unix socket in
//! a temp dir, no bridge and no iptables (no traffic leaves the machine);
//! it is killed when the test ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DOCKERD: &str = "/usr/sbin/dockerd";
/// The docker CLI of the docker.io package (a newer one may insist on buildx).
const DOCKER: &str = "/usr/bin/docker";

/// A private dockerd, killed (and its mounts undone) on drop.
struct PrivateDockerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl PrivateDockerd {
    /// Start it and wait until `docker version` answers; `Err` says why it could not.
    fn start() -> Result<PrivateDockerd, String> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--iptables=false", "--ip-masq=false", "--bridge=none"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let mut daemon = PrivateDockerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if daemon.docker(&["version"]).status.success() {
                return Ok(daemon);
            }
            if Instant::now() > deadline || daemon.child.try_wait().unwrap().is_some() {
                let log = std::fs::read_to_string(daemon.dir.path().join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!("dockerd did not come up:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .env("DOCKER_HOST", format!("unix://{}", self.dir.path().join("docker.sock").display()))
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // SIGTERM first so dockerd stops its containerd and unmounts.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-R").arg(self.dir.path()).stderr(Stdio::null()).status();
    }
}

fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nRUN mkdir /app && echo built-by-kiln > /app/msg\nCOPY note.txt /app/note.txt\n\
         ENV GREETING=hello-docker\nCMD [\"sh\", \"-c\", \"cat /app/msg /app/note.txt; echo $GREETING\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("note.txt"), "note from the context\n").unwrap();
}

#[test]
fn docker_load_accepts_kiln_archives_and_runs_them() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: docker load interop because it needs root (dockerd, containers)");
        return;
    }
    if !Path::new(DOCKERD).exists() || !Path::new(DOCKER).exists() {
        println!("skipped: docker load interop because docker.io is not installed (scripts/deps.sh installs it)");
        return;
    }
    let reg = TestRegistry::with_busybox();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let ctx: PathBuf = tmp.path().join("ctx");
    write_context(&ctx);
    let mirror = format!("docker.io=http://{}", reg.addr);
    let archive = tmp.path().join("built.tar");
    let output = format!("type=docker,dest={},name=kiln-interop/built:1", archive.display());
    kiln_ok(&root, &["--registry-mirror", &mirror, "build", "--progress", "plain", "-t", "kiln-interop/saved:2", "-o", &output, ctx.to_str().unwrap()]);
    // The same build again goes to the store (cached), then out by `kiln save`.
    kiln_ok(&root, &["--registry-mirror", &mirror, "build", "--progress", "plain", "-t", "kiln-interop/saved:2", ctx.to_str().unwrap()]);
    let saved = tmp.path().join("saved.tar");
    kiln_ok(&root, &["save", "-o", saved.to_str().unwrap(), "kiln-interop/saved:2"]);

    let dockerd = match PrivateDockerd::start() {
        Ok(d) => d,
        Err(why) => panic!("{why}"),
    };
    for (file, name) in [(&archive, "kiln-interop/built:1"), (&saved, "kiln-interop/saved:2")] {
        let loaded = dockerd.docker_ok(&["load", "-i", file.to_str().unwrap()]);
        assert!(loaded.contains(&format!("Loaded image: {name}")), "docker load of {}: {loaded}", file.display());
        let env = dockerd.docker_ok(&["image", "inspect", "--format", "{{json .Config.Env}}", name]);
        assert!(env.contains("GREETING=hello-docker"), "{name}: {env}");
        let ran = dockerd.docker_ok(&["run", "--rm", "--network", "none", name]);
        assert_eq!(ran, "built-by-kiln\nnote from the context\nhello-docker\n", "{name}");
    }
}

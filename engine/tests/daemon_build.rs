//! `kiln build` through the daemon: context upload, cache, concurrency,
//! a client killed mid-build, the docker CLI's classic builder.

mod common;
mod daemon_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon_support::{Daemon, stderr, stdout, write};

/// The image ID from "writing image sha256:... done".
fn image_id(err: &str) -> String {
    err.lines().find_map(|l| l.strip_prefix("writing image ")).and_then(|l| l.strip_suffix(" done")).unwrap_or_else(|| panic!("no image line in:\n{err}")).to_string()
}

fn blob_uploads(log: &str) -> usize {
    log.lines().filter(|l| l.contains("path=/v1/build/context/blobs")).count()
}

/// How many requests the daemon logged with `path` and `status`.
fn requests(log: &str, path: &str, status: u16) -> usize {
    log.lines().filter(|l| l.contains(&format!("path={path} status={status} "))).count()
}

#[test]
fn build_through_the_daemon_uploads_only_what_changed() {
    let d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        &[
            ("Dockerfile", "FROM busybox\nRUN echo built > /built\nCOPY . /app\nCMD [\"cat\", \"/built\", \"/app/a.txt\"]\n"),
            ("a.txt", "hello\n"),
            ("sub/b.txt", "b\n"),
            ("ignored.log", "not sent\n"),
            (".dockerignore", "*.log\n"),
        ],
    );
    let c = ctx.path().to_str().unwrap();
    let first = d.client_reproducible(&["build", "--progress", "plain", "-t", "app:1", c]);
    assert!(first.status.success(), "{}", stderr(&first));
    let id1 = image_id(&stderr(&first));
    assert!(stderr(&first).contains("RUN echo built") && stderr(&first).contains("naming to docker.io/library/app:1"), "{}", stderr(&first));
    assert_eq!(blob_uploads(&d.log()), 1, "the first build uploads the context");
    // The build named its context by key: unknown (412), so it sent the
    // list; the daemon named the missing contents (412), got them, and
    // the build was sent again.
    assert_eq!(requests(&d.log(), "/v1/build", 412), 2, "{}", d.log());
    assert_eq!(requests(&d.log(), "/v1/build", 200), 1, "{}", d.log());
    let laid_out = d.root.join("daemon/contexts");
    let contexts = || -> Vec<(String, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut found: Vec<(String, u64)> = std::fs::read_dir(&laid_out)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::metadata(e.path().join("a.txt")).unwrap().ino()))
            .collect();
        found.sort();
        found
    };
    let first_layout = contexts();
    assert_eq!(first_layout.len(), 1, "{first_layout:?}");

    // Unchanged: everything cached, no upload, same image.
    let again = d.client_reproducible(&["build", "--progress", "plain", "-t", "app:1", c]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(image_id(&stderr(&again)), id1);
    assert!(!stderr(&again).contains(" DONE ") || stderr(&again).matches("CACHED").count() >= 2, "{}", stderr(&again));
    assert_eq!(blob_uploads(&d.log()), 1, "an unchanged context uploads nothing");
    // ... and is one request naming the context by key: no 412, no
    // separate question about contents, the same laid-out directory
    // (same inodes: not laid out again).
    assert_eq!(requests(&d.log(), "/v1/build", 412), 2, "{}", d.log());
    assert_eq!(requests(&d.log(), "/v1/build", 200), 2, "{}", d.log());
    assert!(!d.log().contains("path=/v1/build/context/missing"), "{}", d.log());
    assert_eq!(contexts(), first_layout);
    // A key the daemon does not keep: 412, and nothing is built.
    let (status, _, body) = d.http("POST", "/v1/build", br#"{"context_key":"0000000000000000000000000000000000000000000000000000000000000000","dockerfile":"FROM busybox\n"}"#);
    assert_eq!(status, 412, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("does not keep this context"), "{}", String::from_utf8_lossy(&body));

    // Touching a file changes nothing either.
    let now = std::time::SystemTime::now();
    std::fs::File::options().write(true).open(ctx.path().join("a.txt")).unwrap().set_modified(now).unwrap();
    let touched = d.client_reproducible(&["build", "--progress", "plain", c]);
    assert_eq!(image_id(&stderr(&touched)), id1);
    assert_eq!(blob_uploads(&d.log()), 1);

    // One changed file: one upload, a new image, the ignored file is not in it.
    write(ctx.path(), &[("a.txt", "changed\n")]);
    let changed = d.client_reproducible(&["build", "--progress", "plain", "-t", "app:2", c]);
    assert!(changed.status.success(), "{}", stderr(&changed));
    assert_ne!(image_id(&stderr(&changed)), id1);
    assert_eq!(blob_uploads(&d.log()), 2);
    // Unknown key, then missing contents, then the build; laid out anew.
    assert_eq!(requests(&d.log(), "/v1/build", 412), 5, "{}", d.log());
    let changed_layout = contexts();
    assert_eq!(changed_layout.len(), 2, "{changed_layout:?}");
    assert!(changed_layout.contains(&first_layout[0]), "{changed_layout:?}");
    let run = d.client(&["run", "--rm", "app:2"]);
    assert_eq!(stdout(&run), "built\nchanged\n", "{}", stderr(&run));
    let ls = d.client(&["run", "--rm", "app:2", "ls", "/app"]);
    assert!(!stdout(&ls).contains("ignored.log") && stdout(&ls).contains("sub"), "{}", stdout(&ls));

    // A failing build: exit code 1 and the error, as embedded.
    write(ctx.path(), &[("Dockerfile.bad", "FROM busybox\nRUN exit 3\n")]);
    let bad = d.client_reproducible(&["build", "--progress", "plain", "-f", ctx.path().join("Dockerfile.bad").to_str().unwrap(), c]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("exit code: 3"), "{}", stderr(&bad));
    let embedded = common::kiln(&tempfile::tempdir().unwrap().path().join("r"), &["build", "--progress", "plain", "--no-cache", "-f", "/nonexistent/Dockerfile", c]);
    let remote = d.client_reproducible(&["build", "--progress", "plain", "-f", "/nonexistent/Dockerfile", c]);
    assert_eq!(stderr(&remote), stderr(&embedded));
    assert_eq!(remote.status.code(), embedded.status.code());
}

/// A context the daemon keeps is reused with its content known (no walk
/// and no hashing on the daemon, checksums remembered): another Dockerfile
/// over it copies the right files, a changed file still changes the image,
/// and a file changed back gives the first image again.
#[test]
fn a_kept_context_serves_other_builds_and_changes_back() {
    let d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), &[("Dockerfile", "FROM busybox\nCOPY . /app\n"), ("a.txt", "hello\n"), ("sub/b.txt", "b\n")]);
    let other = tempfile::tempdir().unwrap();
    write(other.path(), &[("Other.Dockerfile", "FROM busybox\nCOPY sub /s\nCOPY a.txt /a\n")]);
    let c = ctx.path().to_str().unwrap();
    let other_file = other.path().join("Other.Dockerfile");
    let build = |tag: &str, file: Option<&Path>| {
        let mut args = vec!["build", "--progress", "plain", "-t", tag];
        if let Some(f) = file {
            args.extend(["-f", f.to_str().unwrap()]);
        }
        args.push(c);
        let out = d.client_reproducible(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        image_id(&stderr(&out))
    };
    let cat = |image: &str, paths: &[&str]| {
        let mut args = vec!["run", "--rm", image, "cat"];
        args.extend(paths);
        let out = d.client(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let first = build("ctx:1", None);
    assert_eq!(cat("ctx:1", &["/app/a.txt", "/app/sub/b.txt"]), "hello\nb\n");
    // `-q` through the daemon: the image ID alone on stdout, as embedded.
    let quiet = d.client_reproducible(&["build", "-q", "-t", "ctx:1", c]);
    assert!(quiet.status.success() && stderr(&quiet).is_empty(), "{}", stderr(&quiet));
    assert_eq!(stdout(&quiet), format!("{first}\n"));
    // A build over a kept context is one request naming it by key: no 412.
    let refusals = || requests(&d.log(), "/v1/build", 412);
    assert_eq!(refusals(), 2, "{}", d.log());

    // Another Dockerfile (outside the context) over the kept context.
    build("other:1", Some(&other_file));
    assert_eq!(refusals(), 2, "the context is named by its key: {}", d.log());
    assert_eq!(cat("other:1", &["/a", "/s/b.txt"]), "hello\nb\n");

    // Changed: a new context, a new image with the new content.
    write(ctx.path(), &[("a.txt", "changed\n")]);
    let changed = build("ctx:2", None);
    assert_ne!(changed, first);
    assert_eq!(cat("ctx:2", &["/app/a.txt"]), "changed\n");
    build("other:2", Some(&other_file));
    assert_eq!(cat("other:2", &["/a", "/s/b.txt"]), "changed\nb\n");

    // Changed back: the first context is still kept, and gives the first image.
    write(ctx.path(), &[("a.txt", "hello\n")]);
    let before = refusals();
    assert_eq!(build("ctx:3", None), first);
    assert_eq!(refusals(), before, "{}", d.log());
    build("other:3", Some(&other_file));
    assert_eq!(cat("other:3", &["/a"]), "hello\n");
}

#[test]
fn concurrent_builds_and_a_client_killed_mid_build() {
    let d = Daemon::start(true, &[]);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        write(dir.path(), &[("Dockerfile", &format!("FROM busybox\nRUN sleep 2 && echo {i} > /n\n"))]);
    }
    let started = Instant::now();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["--host", &d.host(), "build", "--progress", "plain", "-t", &format!("c:{i}"), dir.path().to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let took = started.elapsed();
    for i in 0..2 {
        let out = d.client(&["run", "--rm", &format!("c:{i}"), "cat", "/n"]);
        assert_eq!(stdout(&out), format!("{i}\n"));
    }
    assert!(took < Duration::from_secs(12), "two 2 s builds at once took {took:?}");

    // Kill a client while its RUN step sleeps: the daemon stays up and the next build works.
    let slow = tempfile::tempdir().unwrap();
    write(slow.path(), &[("Dockerfile", "FROM busybox\nRUN echo start && sleep 20\n")]);
    let mut victim = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--host", &d.host(), "build", "--progress", "plain", slow.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(victim.stderr.take().unwrap());
        for line in reader.lines() {
            if line.unwrap().contains("RUN echo start") {
                break;
            }
        }
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log().contains("client went away, cancelling its build") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let next = tempfile::tempdir().unwrap();
    write(next.path(), &[("Dockerfile", "FROM busybox\nRUN echo next > /n\n")]);
    let out = d.client(&["build", "--progress", "plain", "-t", "next:1", next.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&d.client(&["run", "--rm", "next:1", "cat", "/n"])), "next\n");
}

/// The daemon applies the store's cap after a build as `kiln build` does,
/// though without holding up the answer: the collection still happens.
#[test]
fn the_cap_is_applied_after_a_daemon_build() {
    let d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), &[("Dockerfile", "FROM busybox\nRUN head -c 300000 /dev/zero > /zeros\nRUN rm /zeros\n")]);
    let c = ctx.path().to_str().unwrap();
    let built = d.client_reproducible(&["build", "--progress", "plain", "--keep-storage", "1", c]);
    assert!(built.status.success(), "{}", stderr(&built));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("gc: store root") {
        assert!(Instant::now() < deadline, "no collection after the build:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("> cap 1: removed"), "{}", d.log());
}

#[test]
fn restart_between_builds_keeps_the_cache() {
    let mut d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), &[("Dockerfile", "FROM busybox\nRUN echo once > /once\n")]);
    let c = ctx.path().to_str().unwrap();
    let first = d.client_reproducible(&["build", "--progress", "plain", c]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(d.stop());
    d.restart(&[]);
    let second = d.client_reproducible(&["build", "--progress", "plain", c]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(image_id(&stderr(&second)), image_id(&stderr(&first)));
    assert!(stderr(&second).contains("#2 CACHED"), "{}", stderr(&second));
}

#[test]
fn docker_build_with_the_classic_builder() {
    let docker = "/usr/bin/docker";
    if !Path::new(docker).is_file() {
        println!("skipped: docker_build_with_the_classic_builder because {docker} is not installed");
        return;
    }
    let d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        &[
            ("Dockerfile", "FROM busybox AS base\nARG WHO=nobody\nRUN echo hello $WHO > /greeting\nFROM base AS final\nCMD [\"cat\", \"/greeting\"]\n"),
            ("other.Dockerfile", "FROM busybox\nRUN exit 5\n"),
        ],
    );
    let config = d.dir.path().join("docker-config");
    let run = |args: &[&str]| {
        Command::new(docker)
            .args(args)
            .current_dir(ctx.path())
            .env("DOCKER_HOST", d.host())
            .env("DOCKER_CONFIG", &config)
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .unwrap()
    };
    let out = run(&["build", "-t", "x", "--build-arg", "WHO=kiln", "--label", "team=build", "--target", "final", "."]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("Successfully built ") && stdout(&out).contains("Successfully tagged x:latest"), "{}", stdout(&out));
    let out = run(&["run", "--rm", "x"]);
    assert_eq!(stdout(&out), "hello kiln\n", "{}", stderr(&out));
    let inspect = run(&["image", "inspect", "x"]);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v[0]["Config"]["Labels"]["team"], "build", "{v}");
    let out = run(&["build", "--no-cache", "-q", "-t", "x:2", "--build-arg", "WHO=kiln", "."]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["build", "-f", "other.Dockerfile", "."]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("exit code: 5"), "{}", stderr(&out));
    let images = run(&["images"]);
    assert!(stdout(&images).contains("x ") && stdout(&images).contains("latest"), "{}", stdout(&images));
}

//! `kiln build` end to end: a busybox image from a local registry (as a
//! docker.io mirror), a real container for RUN, the image in the store.

mod common;

use std::path::{Path, PathBuf};

use common::{TestRegistry, have, kiln, repo_root};

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("containers need root".into());
    }
    for tool in ["docker-registry", "skopeo"] {
        if !have(tool, "--version") && !have(tool, "-v") {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

struct Build {
    ok: bool,
    stderr: String,
}

fn build(root: &Path, reg: &TestRegistry, args: &[&str]) -> Build {
    let mirror = format!("docker.io=http://{}", reg.addr);
    let mut all = vec!["--registry-mirror", mirror.as_str(), "build", "--progress", "plain"];
    all.extend_from_slice(args);
    let out = kiln(root, &all);
    Build { ok: out.status.success(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Read a file of image `name` through its layers.
fn read_in_image(root: &Path, name: &str, path: &str) -> Option<String> {
    let store = kiln_cache::Store::open(root).unwrap();
    let image = kiln_engine::image_source::resolve_local(&store, name, None).unwrap().expect("image in store");
    let view = kiln_cache::layered::LayeredView::new(image.layers.iter().map(|l| store.snapshots.path(l)).collect());
    let entry = view.lookup(Path::new(path)).unwrap()?;
    Some(String::from_utf8_lossy(&std::fs::read(entry.host_path).unwrap()).into_owned())
}

#[test]
fn builds_a_dockerfile_with_cache() {
    if let Some(why) = skip_reason() {
        println!("skipped: kiln build end-to-end because {why}");
        return;
    }
    let reg = TestRegistry::with_busybox();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let ctx: PathBuf = tmp.path().join("ctx");
    copy_dir(&repo_root().join("testdata/build-basic"), &ctx);
    let iid = tmp.path().join("iid");
    let ctx_s = ctx.to_str().unwrap();

    let first = build(&root, &reg, &["-t", "e2e:1", "--iidfile", iid.to_str().unwrap(), ctx_s]);
    assert!(first.ok, "build failed:\n{}", first.stderr);
    assert!(first.stderr.contains("RUN echo") && first.stderr.contains("DONE"), "{}", first.stderr);
    assert_eq!(read_in_image(&root, "e2e:1", "app/built.txt").as_deref(), Some("built: hello from the context\n"));
    assert_eq!(read_in_image(&root, "e2e:1", "app/hello.txt").as_deref(), Some("hello from the context\n"));
    assert!(read_in_image(&root, "e2e:1", "app/ignored.txt").is_none(), ".dockerignore not applied");
    assert!(read_in_image(&root, "e2e:1", "bin/busybox").is_some(), "base layers missing");
    let id = std::fs::read_to_string(&iid).unwrap();
    assert!(id.starts_with("sha256:"), "{id}");

    // Nothing changed: every step cached.
    let again = build(&root, &reg, &["-t", "e2e:1", "--iidfile", iid.to_str().unwrap(), ctx_s]);
    assert!(again.ok, "{}", again.stderr);
    assert!(again.stderr.contains("CACHED"), "{}", again.stderr);
    let run_done = again.stderr.lines().filter(|l| l.contains(" DONE ")).count();
    assert_eq!(run_done, 1, "only the image source may report DONE on a cached rebuild:\n{}", again.stderr);
    // `-q`: the image ID alone on stdout, nothing on stderr.
    let mirror = format!("docker.io=http://{}", reg.addr);
    let quiet = kiln(&root, &["--registry-mirror", &mirror, "build", "-q", "-t", "e2e:1", ctx_s]);
    assert!(quiet.status.success(), "{}", String::from_utf8_lossy(&quiet.stderr));
    let quiet_id = String::from_utf8_lossy(&quiet.stdout).into_owned();
    assert!(quiet_id.starts_with("sha256:") && quiet_id.trim().len() == 71 && quiet_id.lines().count() == 1, "{quiet_id:?}");
    assert!(quiet.stderr.is_empty(), "{}", String::from_utf8_lossy(&quiet.stderr));
    // The layers are the very same snapshots (the config's `created` moves).
    let layers = |name: &str| {
        let store = kiln_cache::Store::open(&root).unwrap();
        kiln_engine::image_source::resolve_local(&store, name, None).unwrap().unwrap().layers
    };
    let before = layers("e2e:1");

    // Touch: still cached. Change: the COPY and the RUN run again.
    std::fs::write(ctx.join("hello.txt"), "hello from the context\n").unwrap();
    let touched = build(&root, &reg, &["-t", "e2e:1", ctx_s]);
    assert_eq!(layers("e2e:1"), before);
    assert!(touched.ok, "{}", touched.stderr);
    assert_eq!(touched.stderr.lines().filter(|l| l.contains(" DONE ")).count(), 1, "touch re-executed:\n{}", touched.stderr);
    std::fs::write(ctx.join("hello.txt"), "changed\n").unwrap();
    let changed = build(&root, &reg, &["-t", "e2e:2", ctx_s]);
    assert!(changed.ok, "{}", changed.stderr);
    assert_eq!(read_in_image(&root, "e2e:2", "app/built.txt").as_deref(), Some("built: changed\n"));

    // A failing RUN: the step, its line and its output.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("Dockerfile"), "FROM busybox\nRUN echo about-to-fail && exit 4\n").unwrap();
    let failed = build(&root, &reg, &[bad.to_str().unwrap()]);
    assert!(!failed.ok);
    assert!(failed.stderr.contains("line 2") && failed.stderr.contains("about-to-fail") && failed.stderr.contains("exit code: 4"),
        "{}", failed.stderr);
    // `-q` and a failure: the log after all, and no ID.
    let failed_quietly = kiln(&root, &["--registry-mirror", &mirror, "build", "-q", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&failed_quietly.stderr);
    assert!(!failed_quietly.status.success() && failed_quietly.stdout.is_empty(), "{err}");
    assert!(err.lines().any(|l| l.starts_with('#') && l.ends_with(" about-to-fail")), "no step log: {err}");
}

/// `kiln` with a deadline: a hang fails the test instead of stalling it.
fn kiln_within(root: &Path, args: &[&str], secs: u64) -> std::process::Output {
    use std::process::{Command, Stdio};
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().unwrap().unwrap();
            panic!("kiln {args:?} did not finish in {secs}s; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn run_as_a_non_root_user_finishes() {
    if let Some(why) = skip_reason() {
        println!("skipped: kiln build with USER because {why}");
        return;
    }
    let reg = TestRegistry::with_busybox();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let ctx = tmp.path().join("ctx");
    copy_dir(&repo_root().join("testdata/user-run"), &ctx);
    let mirror = format!("docker.io=http://{}", reg.addr);
    let out = kiln_within(
        &root,
        &["--registry-mirror", &mirror, "build", "--progress", "plain", "-t", "user:1", ctx.to_str().unwrap()],
        240,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build failed:\n{stderr}");
    // busybox's /etc/passwd: nobody is 65534.
    assert_eq!(read_in_image(&root, "user:1", "data/uid.txt").as_deref(), Some("65534\n"));
    assert!(read_in_image(&root, "user:1", "data/made-by-nobody").is_some(), "{stderr}");
}

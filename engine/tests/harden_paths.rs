//! Path escapes: hostile Dockerfiles, contexts and base images try to make
//! a build write (or read) outside its rootfs. A canary directory on the
//! host must be unchanged after each; each build must fail with a clear
//! error or keep everything inside the rootfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{TestRegistry, have, kiln_ok};

/// One scenario's world: a store, a registry mirror with busybox, a
/// crafted base image `evil:1` and a host canary directory.
struct World {
    _reg: TestRegistry,
    mirror: String,
    tmp: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
}

const CANARY_TEXT: &str = "host canary, must not change\n";

impl World {
    fn new() -> Option<World> {
        if !nix::unistd::Uid::effective().is_root() {
            println!("skipped: path escapes because containers need root");
            return None;
        }
        if !have("docker-registry", "path escapes") || !have("skopeo", "path escapes") {
            return None;
        }
        let reg = TestRegistry::with_busybox();
        let mirror = format!("docker.io=http://{}", reg.addr);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let canary = tmp.path().join("canary");
        std::fs::create_dir_all(&canary).unwrap();
        std::fs::write(canary.join("canary.txt"), CANARY_TEXT).unwrap();
        // A base layer with symlinks leading out of any rootfs.
        let layer = tmp.path().join("evil.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&layer).unwrap());
        symlink(&mut b, "evil", "/");
        symlink(&mut b, "hostdir", canary.to_str().unwrap());
        symlink(&mut b, "hostfile", canary.join("canary.txt").to_str().unwrap());
        symlink(&mut b, "up", "../../../../../../../../..");
        b.finish().unwrap();
        drop(b);
        kiln_ok(&root, &["import", layer.to_str().unwrap(), "evil:1"]);
        Some(World { _reg: reg, mirror, tmp, root, canary })
    }

    /// `kiln build` of `dockerfile` in a fresh context holding `files`,
    /// exported to a local directory; returns the output and that dir.
    fn build(&self, name: &str, dockerfile: &str, files: &[(&str, &[u8])]) -> (Output, PathBuf) {
        let ctx = self.tmp.path().join(format!("ctx-{name}"));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        for (path, bytes) in files {
            std::fs::write(ctx.join(path), bytes).unwrap();
        }
        let dest = self.tmp.path().join(format!("out-{name}"));
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(&self.root)
            .args(["--registry-mirror", &self.mirror, "build", "--progress", "plain"])
            .args(["-o", &format!("type=local,dest={}", dest.display())])
            .arg(&ctx)
            .output()
            .unwrap();
        (out, dest)
    }

    /// The canary directory is exactly as created.
    fn assert_canary(&self, case: &str, out: &Output) {
        let names: Vec<_> = std::fs::read_dir(&self.canary).unwrap().map(|e| e.unwrap().file_name()).collect();
        let text = std::fs::read_to_string(self.canary.join("canary.txt")).unwrap_or_default();
        assert!(
            names.len() == 1 && text == CANARY_TEXT,
            "{case}: ESCAPED — host canary dir now holds {names:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{case}: {}", outcome(out));
    }

    fn host_target(&self) -> String {
        self.canary.to_string_lossy().into_owned()
    }
}

fn outcome(out: &Output) -> String {
    if out.status.success() {
        "built, stayed inside".into()
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        assert!(!last.contains("panicked"), "a panic instead of an error: {err}");
        format!("refused: {last}")
    }
}

fn symlink(b: &mut tar::Builder<std::fs::File>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// A ustar archive whose member names are written raw (the tar crate's
/// builder refuses `..`). An entry whose data starts with `->` is a symlink
/// to the rest.
fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let data: &[u8] = match data.strip_prefix(b"->") {
            Some(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(std::str::from_utf8(target).unwrap()).unwrap();
                &[]
            }
            None => {
                h.set_entry_type(tar::EntryType::Regular);
                data
            }
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn hostile_builds_stay_inside_the_rootfs() {
    let Some(w) = World::new() else { return };
    let host = w.host_target();

    // COPY / WORKDIR through base-image symlinks that point out.
    let (out, _) = w.build(
        "copy-through-symlink",
        &format!("FROM evil:1\nCOPY f.txt /evil{host}/pwned-copy\nCOPY f.txt /hostdir/pwned-copy2\nCOPY f.txt /up{host}/pwned-up\n"),
        &[("f.txt", b"pwned\n")],
    );
    w.assert_canary("COPY through /evil -> / and /hostdir -> host dir", &out);
    let (out, _) = w.build("workdir-through-symlink", &format!("FROM evil:1\nWORKDIR /evil{host}/pwned-wd\nWORKDIR /hostdir/pwned-wd2\nCOPY f.txt pwned-rel\n"), &[("f.txt", b"x")]);
    w.assert_canary("WORKDIR through symlinks", &out);

    // COPY --from a stage whose files are symlinks out: must not copy host files.
    for (i, src) in ["/hostfile", "/evil/etc/hostname", "/up/etc/hostname"].iter().enumerate() {
        let df = format!("FROM evil:1 AS s\nFROM busybox\nCOPY --from=s {src} /got\n");
        let (out, dest) = w.build(&format!("copy-from-symlinks-{i}"), &df, &[]);
        w.assert_canary(&format!("COPY --from a stage's {src} (symlink leading out)"), &out);
        if let Ok(got) = std::fs::read(dest.join("got")) {
            let host_file = std::fs::read(src.replace("/evil", "").replace("/up", "")).unwrap_or_default();
            assert!(got != CANARY_TEXT.as_bytes() && got != host_file, "COPY --from {src} read a host file through a symlink");
        }
    }

    // Cache mount ids and sources with `..`.
    let (out, _) = w.build(
        "cache-mount-dots",
        &format!("FROM busybox\nRUN --mount=type=cache,id=../../../../../../../..{host},target=/c touch /c/pwned-cache\n\
                  RUN --mount=type=cache,id=c1,source=../../../../../../../..{host},target=/c touch /c/pwned-cache2\n"),
        &[],
    );
    w.assert_canary("cache mount id/source with ..", &out);

    // Bind mount from an image that holds symlinks to / and to the host dir.
    for (i, src) in ["/hostdir", "/evil", "/up"].iter().enumerate() {
        let host = w.host_target();
        let df = format!("FROM busybox\nRUN --mount=type=bind,from=evil:1,source={src},target=/m,rw sh -c 'touch /m/pwned-bind; touch /m{host}/pwned-bind2; ls /m'\n");
        let (out, _) = w.build(&format!("bind-from-symlink-{i}"), &df, &[]);
        w.assert_canary(&format!("RUN --mount=type=bind,from=IMAGE,source={src} (symlink out)"), &out);
        assert!(!Path::new("/pwned-bind").exists(), "bind mount of {src} wrote /pwned-bind on the host");
    }

    // WORKDIR into /proc/self/fd/N.
    let (out, _) = w.build("workdir-proc-fd", "FROM busybox\nWORKDIR /proc/self/fd/3\nRUN touch pwned-fd || true\nCOPY Dockerfile pwned-copyfd\n", &[]);
    w.assert_canary("WORKDIR /proc/self/fd/N", &out);

    // ADD of a tar with ../ entries.
    let link = format!("->{host}");
    let evil_tar = raw_tar(&[
        ("../../../../../../../../../../tmp/kiln-pwned-add", b"x"),
        ("a/../../../pwned-add2", b"x"),
        ("hostlink", link.as_bytes()),
        ("hostlink/pwned-add3", b"x"),
    ]);
    let (out, _) = w.build("add-dotdot-tar", "FROM busybox\nADD evil.tar /x/\n", &[("evil.tar", &evil_tar)]);
    w.assert_canary("ADD of a tar with ../ entries", &out);
    assert!(!Path::new("/tmp/kiln-pwned-add").exists(), "ADD wrote /tmp/kiln-pwned-add on the host");

    // A context tar on stdin with escaping entries.
    let ctx_tar = raw_tar(&[
        ("Dockerfile", b"FROM busybox\nCOPY . /ctx/\n"),
        ("../../../../../../../../../tmp/kiln-pwned-ctx", b"x"),
        ("hostlink", link.as_bytes()),
        ("hostlink/pwned-ctx2", b"x"),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(&w.root)
        .args(["--registry-mirror", &w.mirror, "build", "--progress", "plain", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &ctx_tar).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    w.assert_canary("context tar on stdin with ../ entries", &out);
    assert!(!Path::new("/tmp/kiln-pwned-ctx").exists(), "the stdin context wrote /tmp/kiln-pwned-ctx on the host");

    // Nothing named pwned anywhere outside the store's own snapshots.
    let mut stray = Vec::new();
    let mut todo = vec![w.tmp.path().to_path_buf()];
    while let Some(d) = todo.pop() {
        if d == w.root {
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().contains("pwned") && !p.starts_with(w.tmp.path().join("out-")) {
                stray.push(p.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !p.to_string_lossy().contains("/out-") {
                todo.push(p);
            }
        }
    }
    assert!(stray.is_empty(), "files written outside the rootfs: {stray:?}");
}

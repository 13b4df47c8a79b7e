//! Files crossing the socket with `kiln --host`: build outputs written on
//! the client, secrets, import/load/save uploads and downloads, login,
//! bind mounts. Each is checked against embedded mode where both apply.

mod common;
mod daemon_support;

use std::path::Path;
use std::process::{Command, Output};

use common::{TestRegistry, tree};
use daemon_support::{Daemon, stderr, stdout, write};

/// Embedded `kiln --root ROOT ARGS` with `SOURCE_DATE_EPOCH=0`.
fn embedded(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).arg("--root").arg(root).args(args).env("SOURCE_DATE_EPOCH", "0").output().unwrap()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {}\nstderr: {}", out.status, stdout(&out), stderr(&out));
    out
}

/// Two output trees are the same: names, types, contents, link targets, modes.
fn same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(ta, tb, "file lists of {} and {}", a.display(), b.display());
    for rel in &ta {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let (ma, mb) = (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap());
        assert_eq!(ma.mode(), mb.mode(), "mode of {rel}");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "owner of {rel}");
        if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap(), "link {rel}");
        } else if ma.is_file() {
            assert!(std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(), "contents of {rel}");
        }
    }
}

/// Nothing is left in the daemon's scratch directory once requests are done.
fn scratch_is_empty(d: &Daemon) {
    let left = tree(&d.root.join("daemon").join("tmp"));
    assert!(left.is_empty(), "leftovers in the daemon's scratch dir: {left:?}");
}

#[test]
fn build_outputs_land_on_the_client_as_in_embedded_mode() {
    let d = Daemon::start(true, &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        &[
            ("Dockerfile", "FROM busybox\nRUN echo built > /built && mkdir -p /d && ln -s /built /d/link && chmod 0750 /d\nCOPY a.txt /a.txt\n"),
            ("a.txt", "hello\n"),
        ],
    );
    let ctx_arg = ctx.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("fs.tar", "type=tar,dest="),
        ("oci.tar", "type=oci,dest="),
        ("docker.tar", "type=docker,name=out:1,dest="),
        ("fs", "type=local,dest="),
        ("layout", "type=oci,dest="),
    ] {
        let (remote_dest, embedded_dest) = (out.path().join(format!("remote-{name}")), out.path().join(format!("embedded-{name}")));
        let (remote_iid, embedded_iid) = (out.path().join(format!("remote-{name}.iid")), out.path().join(format!("embedded-{name}.iid")));
        let spec_for = |dest: &Path| format!("{spec}{}", dest.display());
        let remote = ok(
            d.client_reproducible(&["build", "--progress", "plain", "-o", &spec_for(&remote_dest), "--iidfile", remote_iid.to_str().unwrap(), ctx_arg]),
            "remote build",
        );
        let local = ok(
            embedded(&d.root, &["build", "--progress", "plain", "-o", &spec_for(&embedded_dest), "--iidfile", embedded_iid.to_str().unwrap(), ctx_arg]),
            "embedded build",
        );
        assert_eq!(remote.status.code(), local.status.code());
        if remote_dest.is_dir() {
            assert!(embedded_dest.is_dir(), "{name}");
            same_tree(&remote_dest, &embedded_dest);
        } else {
            let (a, b) = (std::fs::read(&remote_dest).unwrap(), std::fs::read(&embedded_dest).unwrap());
            assert!(a.len() > 1024, "{name}: {} bytes", a.len());
            assert!(a == b, "{name}: the client's file differs from the embedded one ({} vs {} bytes)", a.len(), b.len());
        }
        // Image outputs name the image the same way and write the same iidfile.
        assert_eq!(remote_iid.exists(), embedded_iid.exists(), "{name}");
        if remote_iid.exists() {
            let id = std::fs::read_to_string(&remote_iid).unwrap();
            assert_eq!(id, std::fs::read_to_string(&embedded_iid).unwrap(), "{name}");
            assert!(stderr(&remote).contains(&format!("writing image {id} done")), "{}", stderr(&remote));
        }
    }
    let fs = out.path().join("remote-fs");
    assert_eq!(std::fs::read_to_string(fs.join("built")).unwrap(), "built\n");
    assert_eq!(std::fs::read_link(fs.join("d/link")).unwrap(), Path::new("/built"));
    assert!(out.path().join("remote-layout/index.json").is_file());

    // An existing destination is refused before anything is built, with the
    // embedded mode's message, and nothing half-written stays around.
    let before = tree(out.path());
    let taken = out.path().join("remote-fs.tar");
    let refused = d.client(&["build", "-o", &format!("type=tar,dest={}", taken.display()), ctx_arg]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains(&format!("cannot write {}: it already exists", taken.display())), "{}", stderr(&refused));
    // A bad -o is refused as in embedded mode.
    let bad_remote = d.client(&["build", "-o", "type=nope", ctx_arg]);
    let bad_local = embedded(&d.root, &["build", "-o", "type=nope", ctx_arg]);
    assert_eq!((stderr(&bad_remote), bad_remote.status.code()), (stderr(&bad_local), bad_local.status.code()));
    let bad_remote = d.client(&["build", "--keep-storage", "lots", ctx_arg]);
    let bad_local = embedded(&d.root, &["build", "--keep-storage", "lots", ctx_arg]);
    assert_eq!((stderr(&bad_remote), bad_remote.status.code()), (stderr(&bad_local), bad_local.status.code()));
    assert_eq!(bad_remote.status.code(), Some(1));
    assert_eq!(tree(out.path()), before, "no staging files left beside the outputs");
    scratch_is_empty(&d);
}

#[test]
fn secrets_reach_the_build_but_not_the_daemons_log_or_store() {
    let d = Daemon::start(true, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    let value = "kiln-daemon-secret-4c7e19a0b2";
    write(
        &ctx,
        &[("Dockerfile", "FROM busybox\nRUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /tok.sha\n")],
    );
    let secret_file = tmp.path().join("token.txt");
    std::fs::write(&secret_file, value).unwrap();
    let dest = tmp.path().join("out");
    let out = ok(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["--host", &d.host(), "build", "--progress", "plain", "--no-cache"])
            .args(["--secret", &format!("id=tok,src={}", secret_file.display())])
            .args(["-o", &format!("type=local,dest={}", dest.display())])
            .arg(&ctx)
            .output()
            .unwrap(),
        "build with a secret",
    );
    let want = common::sha256(value.as_bytes());
    let got = std::fs::read_to_string(dest.join("tok.sha")).unwrap();
    assert_eq!(got.trim(), want.trim_start_matches("sha256:"), "the RUN saw the secret");
    assert!(!stdout(&out).contains(value) && !stderr(&out).contains(value));
    assert!(!d.log().contains(value), "the daemon's log holds the secret");
    let grep = Command::new("grep").args(["-r", "-l", "-a", value]).arg(&d.root).output().unwrap();
    assert_eq!(grep.status.code(), Some(1), "the store holds the secret in: {}", stdout(&grep));
    scratch_is_empty(&d);
}

#[test]
fn save_load_and_import_through_the_daemon() {
    let d = Daemon::start(true, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let client = |args: &[&str]| d.client_in(work, args);
    let local = |root: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln")).current_dir(work).arg("--root").arg(root).args(args).output().unwrap()
    };
    let same = |remote: &Output, embedded: &Output, what: &str| {
        assert_eq!(stdout(remote).replace("remote", "X"), stdout(embedded).replace("embedded", "X"), "stdout of {what}");
        assert_eq!(stderr(remote).replace("remote", "X"), stderr(embedded).replace("embedded", "X"), "stderr of {what}");
        assert_eq!(remote.status.code(), embedded.status.code(), "exit code of {what}");
    };

    // save: the same archive bytes and messages as embedded, in both formats.
    let r = ok(client(&["save", "-o", "remote.tar", "busybox"]), "remote save");
    let e = ok(local(&d.root, &["save", "-o", "embedded.tar", "busybox"]), "embedded save");
    same(&r, &e, "save");
    assert!(std::fs::read(work.join("remote.tar")).unwrap() == std::fs::read(work.join("embedded.tar")).unwrap(), "docker archives differ");
    let r = ok(client(&["save", "--format", "oci", "-o", "remote-layout", "busybox"]), "remote save oci");
    let e = ok(local(&d.root, &["save", "--format", "oci", "-o", "embedded-layout", "busybox"]), "embedded save oci");
    same(&r, &e, "save --format oci");
    same_tree(&work.join("remote-layout"), &work.join("embedded-layout"));
    // To stdout (the default): the same bytes, the summary on stderr.
    let r = ok(client(&["save", "busybox"]), "remote save to stdout");
    let e = ok(local(&d.root, &["save", "busybox"]), "embedded save to stdout");
    assert!(r.stdout.len() > 1024 && r.stdout == e.stdout, "archives on stdout differ ({} vs {} bytes)", r.stdout.len(), e.stdout.len());
    assert_eq!(stderr(&r), stderr(&e));
    let r = client(&["save", "-o", "remote.tar", "busybox"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("already exists"), "{}", stderr(&r));
    let r = client(&["save", "-o", "remote-missing.tar", "no-such-image"]);
    let e = local(&d.root, &["save", "-o", "embedded-missing.tar", "no-such-image"]);
    same(&r, &e, "save of a missing image");
    assert!(!work.join("remote-missing.tar").exists());

    // load into a second daemon: the archive, and a layout directory.
    let d2 = Daemon::start(false, &[]);
    let fresh = tempfile::tempdir().unwrap();
    let r = ok(d2.client_in(work, &["load", "-i", "remote.tar"]), "remote load");
    let e = ok(local(fresh.path(), &["load", "-i", "remote.tar"]), "embedded load");
    same(&r, &e, "load");
    assert!(stdout(&r).starts_with("Loaded image: busybox:latest (sha256:"), "{}", stdout(&r));
    let r = ok(d2.client_in(work, &["load", "-i", "remote-layout", "-t", "from-dir:1"]), "remote load of a directory");
    assert!(stdout(&r).contains("Loaded image: "), "{}", stdout(&r));
    let r = d2.client_in(work, &["load", "-i", "nothing-here.tar"]);
    let e = local(fresh.path(), &["load", "-i", "nothing-here.tar"]);
    same(&r, &e, "load of a missing file");
    std::fs::write(work.join("garbage.tar"), vec![7u8; 4096]).unwrap();
    let r = d2.client_in(work, &["load", "-i", "garbage.tar"]);
    let e = local(fresh.path(), &["load", "-i", "garbage.tar"]);
    same(&r, &e, "load of garbage");
    assert_eq!(r.status.code(), Some(1));
    let ran = ok(d2.client(&["run", "busybox", "echo", "loaded"]), "run a loaded image");
    assert_eq!(stdout(&ran), "loaded\n");

    // import: a filesystem tar (built through the daemon) becomes an image.
    let ctx = work.join("ctx");
    write(&ctx, &[("Dockerfile", "FROM busybox\nRUN echo imported > /msg\n")]);
    ok(client(&["build", "-o", "type=tar,dest=rootfs.tar", "ctx"]), "build a rootfs tar");
    let r = ok(client(&["import", "rootfs.tar", "mine:1"]), "remote import");
    assert!(stdout(&r).starts_with("mine:1: imported sha256:"), "{}", stdout(&r));
    let ran = ok(client(&["run", "mine:1", "cat", "/msg"]), "run the imported image");
    assert_eq!(stdout(&ran), "imported\n");
    let inspected = stdout(&ok(client(&["inspect", "mine:1"]), "inspect"));
    assert!(inspected.contains("kiln import rootfs.tar"), "history names the client's file: {inspected}");
    let r = client(&["import", "nope.tar", "x:1"]);
    let e = local(&d.root, &["import", "nope.tar", "x:1"]);
    same(&r, &e, "import of a missing file");
    // The client's SOURCE_DATE_EPOCH dates the image, as in embedded mode:
    // the same tar gives the same image ID on both sides.
    let r = ok(d.client_reproducible(&["import", work.join("rootfs.tar").to_str().unwrap(), "dated:1"]), "remote import at epoch 0");
    let fresh_root = tempfile::tempdir().unwrap();
    let e = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(fresh_root.path())
        .args(["import", work.join("rootfs.tar").to_str().unwrap(), "dated:1"])
        .env("SOURCE_DATE_EPOCH", "0")
        .output()
        .unwrap();
    let e = ok(e, "embedded import at epoch 0");
    assert_eq!(stdout(&r), stdout(&e), "image IDs differ");
    let inspected = stdout(&ok(client(&["inspect", "dated:1"]), "inspect"));
    assert!(inspected.contains("1970-01-01T00:00:00Z"), "{inspected}");
    scratch_is_empty(&d);
    scratch_is_empty(&d2);
}

#[test]
fn login_stores_credentials_where_the_daemon_uses_them() {
    if !common::have("docker-registry", "login test") || !common::have("skopeo", "login test") {
        return;
    }
    let reg = TestRegistry::start_with(Some(common::BasicAuth { htpasswd_line: common::TEST_HTPASSWD }));
    let (user, password) = common::TEST_USER;
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", &format!("{user}:{password}")])
        .arg(format!("oci:{}:latest", common::busybox_layout().display()))
        .arg(format!("docker://{}/private/bb:latest", reg.addr))
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", stderr(&copied));
    let config = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let d = Daemon::start_env(dir, root, &["--insecure-registry", &reg.addr], &[("DOCKER_CONFIG", config.path().to_str().unwrap())]);
    let image = format!("{}/private/bb:latest", reg.addr);
    let denied = d.client(&["pull", &image]);
    assert!(!denied.status.success() && stderr(&denied).contains("unauthorized"), "{}", stderr(&denied));
    let wrong = d.client(&["login", "-u", user, "-p", "wrong-password", &reg.addr]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("unauthorized"), "{}", stderr(&wrong));
    assert!(!config.path().join("config.json").exists(), "nothing stored for a failed login");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--host", &d.host(), "login", "-u", user, "--password-stdin", &format!("http://{}/", reg.addr)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let logged = ok(child.wait_with_output().unwrap(), "login");
    let auth_file = config.path().join("config.json");
    assert_eq!(stdout(&logged), format!("Login succeeded ({})\n", auth_file.display()));
    assert!(std::fs::read_to_string(&auth_file).unwrap().contains(&reg.addr));
    ok(d.client(&["pull", &image]), "pull after login");
    assert!(!d.log().contains(password), "the daemon's log holds the password");
}

#[test]
fn run_bind_mounts_are_the_daemon_hosts_paths() {
    let d = Daemon::start(true, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write(&data, &[("in.txt", "from the host\n")]);
    let volume = format!("{}:/data", data.display());
    let out = ok(d.client(&["run", "-v", &volume, "busybox", "sh", "-c", "cat /data/in.txt; echo back > /data/out.txt"]), "run -v");
    assert_eq!(stdout(&out), "from the host\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "back\n");
    // Read-only, and a relative path taken from the client's directory.
    let out = d.client_in(tmp.path(), &["run", "-v", "data:/data:ro", "busybox", "sh", "-c", "cat /data/in.txt; echo x > /data/y"]);
    assert_eq!(stdout(&out), "from the host\n");
    assert_ne!(out.status.code(), Some(0), "writing to a read-only bind must fail");
    assert!(stderr(&out).contains("Read-only file system"), "{}", stderr(&out));
    assert!(!data.join("y").exists());
    let out = d.client(&["run", "-v", "/no/such/dir:/data", "busybox", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/no/such/dir"), "{}", stderr(&out));
}

/// `kiln --host ARGS` with `input` on its stdin.
fn client_with_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> Output {
    kiln_with_stdin(&["--host", &d.host()], args, input)
}

fn kiln_with_stdin(global: &[&str], args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(global)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written from a thread: the container's output must be read meanwhile.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn run_interactive_streams_stdin_as_embedded_mode_does() {
    let d = Daemon::start(true, &[]);
    let root = d.root.to_str().unwrap().to_string();
    for (args, input) in [
        (vec!["run", "-i", "busybox", "sh", "-c", "cat; echo done"], b"hello\nworld\n".to_vec()),
        (vec!["run", "-i", "busybox", "sh", "-c", "read x; echo got $x; exit 3"], b"one\ntwo\n".to_vec()),
        (vec!["run", "-i", "busybox", "wc", "-c"], vec![b'x'; 3 << 20]),
        (vec!["run", "-i", "busybox", "sh", "-c", "cat >&2"], b"to stderr\n".to_vec()),
    ] {
        let remote = client_with_stdin(&d, &args, &input);
        let embedded = kiln_with_stdin(&["--root", &root], &args, &input);
        assert_eq!(stdout(&remote), stdout(&embedded), "stdout of {args:?}: {}", stderr(&remote));
        assert_eq!(stderr(&remote), stderr(&embedded), "stderr of {args:?}");
        assert_eq!(remote.status.code(), embedded.status.code(), "exit code of {args:?}");
    }
    let out = client_with_stdin(&d, &["run", "-i", "busybox", "wc", "-c"], &vec![b'x'; 3 << 20]);
    assert_eq!(stdout(&out).trim(), (3 << 20).to_string());
    let out = client_with_stdin(&d, &["run", "-i", "busybox", "sh", "-c", "read x; echo got $x; exit 3"], b"one\n");
    assert_eq!((stdout(&out), out.status.code()), ("got one\n".to_string(), Some(3)));
    // Without -i the container reads nothing.
    let out = client_with_stdin(&d, &["run", "busybox", "sh", "-c", "cat; echo end"], b"ignored\n");
    assert_eq!(stdout(&out), "end\n");
    // A plain request asking for stdin without the upgrade is refused clearly.
    let (status, _, body) = d.http("POST", "/v1/containers/run", br#"{"image":"busybox","cmd":["true"],"interactive":true}"#);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("Upgrade: kiln-attach"));
}

/// Clients of the first attach protocol (`Upgrade: kiln-attach`, stdin as
/// base64 in JSON lines) still work beside kiln's binary frames.
#[test]
fn run_interactive_over_the_json_line_protocol() {
    use std::io::{Read, Write};
    let d = Daemon::start(true, &[]);
    let socket = d.host().strip_prefix("unix://").unwrap().to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let body = br#"{"image":"busybox","cmd":["sh","-c","cat; echo end"],"interactive":true}"#;
    let head = format!(
        "POST /v1/containers/run HTTP/1.1\r\nHost: kiln\r\nConnection: Upgrade\r\nUpgrade: kiln-attach\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    // "hello\n" and "world\n" in base64, then the end of stdin.
    stream.write_all(b"{\"stdin\":\"aGVsbG8K\"}\n{\"stdin\":\"d29ybGQK\"}\n\"stdin_eof\"\n").unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("{\"exit\":") {
        let n = stream.read(&mut buf).expect("the daemon's answer");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 101") && text.to_ascii_lowercase().contains("upgrade: kiln-attach\r\n"), "{text}");
    let out: String = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("stdout").and_then(|d| d.as_str()).map(str::to_string))
        .map(|b64| String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()).unwrap())
        .collect();
    assert_eq!(out, "hello\nworld\nend\n", "{text}");
    assert!(text.contains("{\"exit\":0}"), "{text}");
}

/// A script for a tty container: print the terminal's size, wait (up to
/// 20 s) for it to change from 24x80, print it again.
const SIZE_WATCHER: &str = "stty size; i=0; while [ \"$(stty size)\" = '24 80' ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; stty size";

/// The container output (decoded `stdout` lines) of a `/v1/containers/run`
/// answer so far.
fn run_stdout(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("stdout").and_then(|d| d.as_str()).map(str::to_string))
        .map(|b64| String::from_utf8_lossy(&base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()).into_owned())
        .collect()
}

/// Read from `stream` into `answer` until `done` holds of it.
fn read_until(stream: &mut impl std::io::Read, answer: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut buf = [0u8; 4096];
    while !done(answer) {
        let n = stream.read(&mut buf).expect("the daemon's answer");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(answer));
        answer.extend_from_slice(&buf[..n]);
    }
}

/// A terminal resized while the container runs: a size frame of
/// `kiln-attach-2` (and a `{"resize": ...}` line of the first protocol)
/// reaches the container's pty, as does docker's
/// `POST /containers/{id}/resize`.
#[test]
fn resizing_a_running_tty_container() {
    use std::io::Write;
    let d = Daemon::start(true, &[]);
    let socket = d.host().strip_prefix("unix://").unwrap().to_string();
    let body = serde_json::to_vec(&serde_json::json!({
        "image": "busybox", "cmd": ["sh", "-c", SIZE_WATCHER], "tty": true, "console_size": [24, 80]
    }))
    .unwrap();
    let mut frame = vec![2u8, 0, 0, 0, 4];
    frame.extend_from_slice(&50u16.to_be_bytes());
    frame.extend_from_slice(&132u16.to_be_bytes());
    for (protocol, resize) in [("kiln-attach-2", frame), ("kiln-attach", b"{\"resize\":[50,132]}\n".to_vec())] {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        let head = format!(
            "POST /v1/containers/run HTTP/1.1\r\nHost: kiln\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
        let mut answer = Vec::new();
        read_until(&mut stream, &mut answer, |a| run_stdout(a).contains("24 80"));
        stream.write_all(&resize).unwrap();
        read_until(&mut stream, &mut answer, |a| String::from_utf8_lossy(a).contains("{\"exit\":"));
        let out = run_stdout(&answer);
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["24", "80", "50", "132"], "{protocol}: {}", String::from_utf8_lossy(&answer));
        assert!(String::from_utf8_lossy(&answer).contains("{\"exit\":0}"), "{protocol}");
    }

    // Docker's route: create with a tty, start, resize, read the log.
    let create = serde_json::to_vec(&serde_json::json!({
        "Image": "busybox", "Cmd": ["sh", "-c", SIZE_WATCHER], "Tty": true, "HostConfig": {"ConsoleSize": [24, 80]}
    }))
    .unwrap();
    let (status, _, created) = daemon_support::raw_http(&d.socket, "POST", "/v1.41/containers/create", &[("Content-Type", "application/json")], &create);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&created));
    let id = serde_json::from_slice::<serde_json::Value>(&created).unwrap()["Id"].as_str().unwrap().to_string();
    let (status, _, _) = d.http("POST", &format!("/v1.41/containers/{id}/start"), b"");
    assert_eq!(status, 204);
    // The output in the log's 8-byte frames (stream, 0, 0, 0, length).
    let logs = || {
        let (_, _, log) = d.http("GET", &format!("/v1.41/containers/{id}/logs?stdout=1"), b"");
        let (mut rest, mut out) = (&log[..], Vec::new());
        while rest.len() >= 8 {
            let len = u32::from_be_bytes(rest[4..8].try_into().unwrap()) as usize;
            out.extend_from_slice(&rest[8..8 + len]);
            rest = &rest[8 + len..];
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !logs().contains("24 80") {
        assert!(std::time::Instant::now() < deadline, "no first size: {:?}", logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, _, answer) = d.http("POST", &format!("/v1.41/containers/{id}/resize?h=40&w=100"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let (status, _, waited) = d.http("POST", &format!("/v1.41/containers/{id}/wait"), b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&waited).contains("\"StatusCode\":0"), "{}", String::from_utf8_lossy(&waited));
    assert_eq!(logs().split_whitespace().collect::<Vec<_>>(), ["24", "80", "40", "100"], "{:?}", logs());
}

#[test]
fn run_tty_gives_the_container_a_terminal_of_the_clients_size() {
    if !common::have("script", "run_tty_gives_the_container_a_terminal_of_the_clients_size") {
        return;
    }
    let d = Daemon::start(true, &[]);
    let kiln = env!("CARGO_BIN_EXE_kiln");
    // `script` gives kiln a terminal of a known size.
    let inner = format!("stty rows 31 cols 97; {kiln} --host {} run -t busybox sh -c 'tty; stty size; exit 4'", d.host());
    let out = Command::new("script").args(["-qec", &inner, "/dev/null"]).stdin(std::process::Stdio::null()).output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("/dev/pts/"), "tty inside: {text:?}");
    assert!(text.contains("31 97"), "stty size inside: {text:?}");
    assert_eq!(out.status.code(), Some(4), "{text:?} {}", stderr(&out));
    // The same as embedded mode prints.
    let inner = format!("stty rows 31 cols 97; {kiln} --root {} run -t busybox sh -c 'tty; stty size; exit 4'", d.root.display());
    let embedded = Command::new("script").args(["-qec", &inner, "/dev/null"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(stdout(&embedded), text, "embedded -t vs remote -t");
    assert_eq!(embedded.status.code(), Some(4));
    // -it: keys typed on the client reach the shell on the terminal, in
    // both modes.
    for inner in [format!("{kiln} --host {} run -it busybox sh", d.host()), format!("{kiln} --root {} run -it busybox sh", d.root.display())] {
        let mut child = Command::new("script")
            .args(["-qec", &inner, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"echo typed-$((40+2)); exit 6\n").unwrap();
            // Keep our end open until the container has exited.
            let out = child.wait_with_output().unwrap();
            drop(stdin);
            let text = stdout(&out);
            assert!(text.contains("typed-42"), "{inner}: {text:?}");
            assert_eq!(out.status.code(), Some(6), "{inner}: {text:?}");
        }
    }
}

#[test]
fn run_flags_behave_as_in_embedded_mode() {
    let d = Daemon::start(true, &[]);
    let root = d.root.to_str().unwrap().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "-u", "1234:5678", "busybox", "id"],
        vec!["run", "--entrypoint", "/bin/echo", "busybox", "from", "entrypoint"],
        vec!["run", "--entrypoint", "", "busybox", "echo", "cleared"],
        vec!["run", "--hostname", "box1", "busybox", "hostname"],
        vec!["run", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net"],
        vec!["run", "--network", "host", "busybox", "sh", "-c", "test -e /sys/class/net/lo && echo host-net"],
        // 50 MB in a shell variable under a 16 MiB limit: killed (137) in both modes.
        vec!["run", "--memory", "16m", "busybox", "sh", "-c", "x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo ${#x}"],
        vec!["run", "--memory", "256m", "busybox", "sh", "-c", "x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo ${#x}"],
        vec!["run", "--cpus", "0.5", "busybox", "echo", "half a cpu"],
        vec!["run", "--cpus", "0", "busybox", "true"],
        vec!["run", "-e", "A=1", "-e", "HOME", "-w", "/etc", "busybox", "sh", "-c", "echo $A $HOME; pwd"],
        vec!["run", "--network", "bogus", "busybox", "true"],
        vec!["run", "--memory", "lots", "busybox", "true"],
        vec!["run", "busybox", "/no/such/binary"],
    ];
    let hog = |limit: &str| d.client(&["run", "--memory", limit, "busybox", "sh", "-c", "x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo ${#x}"]);
    let (small, big) = (hog("16m"), hog("256m"));
    assert_ne!(small.status.code(), Some(0), "the memory limit reached the container: {}", stdout(&small));
    assert_eq!((stdout(&big), big.status.code()), ("50000000\n".to_string(), Some(0)), "{}", stderr(&big));
    for args in cases {
        let remote = d.client(&args);
        let embedded = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["--root", &root]).args(&args).output().unwrap();
        assert_eq!(remote.status.code(), embedded.status.code(), "exit code of {args:?}: {} / {}", stderr(&remote), stderr(&embedded));
        assert_eq!(stdout(&remote), stdout(&embedded), "stdout of {args:?}");
        if embedded.status.success() {
            assert!(!stdout(&remote).is_empty(), "{args:?} printed nothing");
        }
        // Error messages are the same too (but for the random container ID).
        if !stderr(&embedded).contains("creating container kiln-") {
            assert_eq!(stderr(&remote), stderr(&embedded), "stderr of {args:?}");
        }
    }
}

#[test]
fn registry_outputs_push_in_both_modes() {
    if !common::have("docker-registry", "registry_outputs_push_in_both_modes") {
        return;
    }
    let reg = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    common::kiln_ok(&dir.path().join("root"), &["load", "-i", common::busybox_layout().to_str().unwrap(), "-t", "busybox:latest"]);
    let root = dir.path().join("root");
    let d = Daemon::start_env(dir, root, &["--insecure-registry", &reg.addr], &[]);
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), &[("Dockerfile", "FROM busybox\nRUN echo pushed > /pushed\n")]);
    let ctx_arg = ctx.path().to_str().unwrap();
    let digest_of = |out: &Output, name: &str| -> String {
        let line = stderr(out).lines().find(|l| l.starts_with(&format!("{name}: digest: sha256:"))).unwrap_or_else(|| panic!("no push line for {name}:\n{}", stderr(out))).to_string();
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    let remote_name = format!("{}/remote/app:1", reg.addr);
    let remote = ok(d.client_reproducible(&["build", "--progress", "plain", "-o", &format!("type=registry,name={remote_name}"), ctx_arg]), "remote build -o type=registry");
    let embedded_name = format!("{}/embedded/app:1", reg.addr);
    let embedded = ok(
        embedded(&d.root, &["--insecure-registry", &reg.addr, "build", "--progress", "plain", "-o", &format!("type=registry,name={embedded_name}"), ctx_arg]),
        "embedded build -o type=registry",
    );
    assert_eq!(digest_of(&remote, &remote_name), digest_of(&embedded, &embedded_name), "the same image was pushed");
    // What went to the registry is pullable elsewhere and runs.
    let other = tempfile::tempdir().unwrap();
    common::kiln_ok(other.path(), &["--insecure-registry", &reg.addr, "pull", &remote_name]);
    let ran = common::kiln_ok(other.path(), &["run", &remote_name, "cat", "/pushed"]);
    assert_eq!(ran, "pushed\n");
}

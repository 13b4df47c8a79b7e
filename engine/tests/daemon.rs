//! `kiln serve` and `kiln --host`: real daemon processes on temp sockets
//! with temp store roots.

mod common;
mod daemon_support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestRegistry, kiln, kiln_ok};
use daemon_support::{Daemon, stderr, stdout};

#[test]
fn ping_version_and_socket_mode() {
    let d = Daemon::start(false, &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let (status, head, body) = d.http("GET", "/v1/_ping", b"");
    assert_eq!((status, body.as_slice()), (200, &b"OK"[..]));
    assert!(head.to_ascii_lowercase().contains("kiln-api-version: 1"), "{head}");
    let (status, _, body) = d.http("GET", "/v1/version", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["api_version"], "1");
    // Docker flavour: HEAD and GET /_ping with Api-Version, versioned paths.
    let (status, head, _) = d.http("HEAD", "/_ping", b"");
    assert_eq!(status, 200);
    assert!(head.contains("Api-Version: 1.41") || head.to_ascii_lowercase().contains("api-version: 1.41"), "{head}");
    let (status, _, body) = d.http("GET", "/v1.41/version", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["ApiVersion"], "1.41");
    let (status, _, body) = d.http("GET", "/v1.99/version", b"");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_stays_up() {
    let mut d = Daemon::start(false, &[]);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("GET", "/v1/nothing/here", vec![], 404, "no route"),
        ("GET", "/nothing", vec![], 404, "not part of the Docker API"),
        ("POST", "/v1/images/pull", b"{\"reference\": ".to_vec(), 400, "line 1 column"),
        ("POST", "/v1/images/pull", b"[1,2]".to_vec(), 400, "malformed JSON"),
        ("POST", "/v1/images/pull", b"{\"reference\":\"a\",\"bogus\":1}".to_vec(), 400, "unknown field"),
        ("POST", "/v1/images/pull", vec![b' '; 2 << 20], 413, "larger than the limit"),
        ("GET", "/v1/images?x=%zz", vec![], 400, "percent escape"),
        ("POST", "/v1/containers/run", b"{\"image\":\"nope\"}".to_vec(), 404, "no such image"),
        ("POST", "/containers/create", b"{\"Image\":\"nope\"}".to_vec(), 404, "No such image: nope"),
        ("POST", "/containers/create", b"{\"Cmd\":\"x\"}".to_vec(), 400, "Image is required"),
        ("POST", "/containers/0123/start", vec![], 404, "No such container"),
        ("DELETE", "/images/nope", vec![], 404, "No such image: nope"),
    ];
    for (method, path, body, want, text) in cases {
        let (status, _, answer) = d.http(method, path, &body);
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, want, "{method} {path}: {answer}");
        let message: serde_json::Value = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {answer}"));
        assert!(message["message"].as_str().unwrap().contains(text), "{method} {path}: {answer}");
    }
    // Garbage that is not HTTP at all.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"\x00\x01\x02 not http\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    }
    assert_eq!(d.http("GET", "/v1/_ping", b"").0, 200);
    assert!(d.alive());
    let log = d.log();
    assert!(log.contains("status=413") && log.contains("status=400") && log.contains("status=404"), "log lines:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The client prints what the embedded command prints, with the same exit code.
#[test]
fn client_output_equals_embedded() {
    let d = Daemon::start(true, &[]);
    let both = |args: &[&str]| {
        let embedded = kiln(&d.root, args);
        let remote = d.client(args);
        assert_eq!(stdout(&remote), stdout(&embedded), "stdout of {args:?}");
        assert_eq!(stderr(&remote), stderr(&embedded), "stderr of {args:?}");
        assert_eq!(remote.status.code(), embedded.status.code(), "exit code of {args:?}");
        stdout(&remote)
    };
    let listing = both(&["images"]);
    assert!(listing.contains("busybox") && listing.contains("latest"), "{listing}");
    both(&["images", "-q"]);
    both(&["images", "--no-trunc"]);
    both(&["images", "--json"]);
    let inspected = both(&["inspect", "busybox"]);
    assert!(inspected.contains("\"RepoTags\""), "{inspected}");
    both(&["inspect", "busybox", "no-such-image"]);
    both(&["rmi", "no-such-image"]);
    both(&["tag", "no-such-image", "x:1"]);
    both(&["du"]);
    let pruned = d.client(&["prune", "--keep-storage", "100GB"]);
    assert!(pruned.status.success() && stdout(&pruned).starts_with("Deleted "), "{}", stderr(&pruned));
    both(&["prune", "--keep-storage", "lots"]);

    // Tag through the daemon, then both see it; remove through each side.
    let out = d.client(&["tag", "busybox", "example.com/team/app:v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    kiln_ok(&d.root, &["tag", "busybox", "example.com/team/app:v2"]);
    let listing = both(&["images"]);
    assert!(listing.contains("example.com/team/app") && listing.contains("v1") && listing.contains("v2"), "{listing}");
    let remote = d.client(&["rmi", "example.com/team/app:v1"]);
    let embedded = kiln(&d.root, &["rmi", "example.com/team/app:v2"]);
    assert_eq!(stdout(&remote), "Untagged: example.com/team/app:v1\n");
    assert_eq!(stdout(&embedded), "Untagged: example.com/team/app:v2\n");
    assert_eq!(remote.status.code(), Some(0));

    // kiln check: the same report and exit code, consistent and not.
    let checked = both(&["check", "--deep"]);
    assert!(checked.contains("store is consistent"), "{checked}");
    let blobs = d.root.join("blobs/sha256");
    let victim = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    std::fs::write(&victim, b"not what the digest says").unwrap();
    let broken = both(&["check"]);
    assert!(broken.contains("PROBLEM") && broken.contains("INCONSISTENT"), "{broken}");
    let out = d.client(&["check", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses bad flags before anything is sent: {}", stderr(&out));
}

#[test]
fn run_streams_output_and_returns_the_exit_code() {
    let d = Daemon::start(true, &[]);
    let out = d.client(&["run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    let out = d.client(&["run", "-e", "GREETING=hi there", "-w", "/tmp", "busybox", "sh", "-c", "echo $GREETING; pwd"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi there\n/tmp\n");
    let out = d.client(&["run", "no-such-image", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no such image"), "{}", stderr(&out));
}

#[test]
fn two_clients_at_once_and_a_killed_client() {
    let d = Daemon::start(true, &[]);
    let started = Instant::now();
    let spawn = |code: i32| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["--host", &d.host(), "run", "busybox", "sh", "-c", &format!("sleep 2; echo done {code}; exit {code}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(3), spawn(4));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!((a.status.code(), stdout(&a)), (Some(3), "done 3\n".to_string()), "{}", stderr(&a));
    assert_eq!((b.status.code(), stdout(&b)), (Some(4), "done 4\n".to_string()), "{}", stderr(&b));
    // Both ran concurrently: well under two sequential runs of 2 s each plus startup.
    let both = started.elapsed();
    assert!(both < Duration::from_secs(8), "two concurrent runs took {both:?}");

    // A client killed mid-request: its container is killed, the daemon stays up.
    // A sleep length of its own, so no other process on the machine is taken for it.
    let sleep = format!("sleep {}", 1000 + std::process::id() % 8000);
    let mut victim = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--host", &d.host(), "run", "busybox", "sh", "-c", &format!("echo started; {sleep}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(victim.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "started\n");
    }
    // The container runs in a shim process of the daemon's, not inside it:
    // forked by the daemon's shim zygote (or, without one, exec'd by it).
    let starters = Command::new("pgrep")
        .args(["-f", "-P", &d.pid().to_string(), "__shim-zygote|__container-shim"])
        .output()
        .unwrap();
    assert!(starters.status.success(), "no shim zygote or shim under the daemon (pid {})", d.pid());
    let zygote_shims = stdout(&starters)
        .lines()
        .filter_map(|pid| Command::new("pgrep").args(["-P", pid.trim(), "-x", "kiln-shim"]).output().ok())
        .any(|o| o.status.success());
    let exec_shim = Command::new("pgrep").args(["-f", "-P", &d.pid().to_string(), "__container-shim"]).output().unwrap();
    assert!(zygote_shims || exec_shim.status.success(), "no container shim under the daemon (pid {})", d.pid());
    victim.kill().unwrap();
    victim.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log().contains("client went away") {
        assert!(Instant::now() < deadline, "the daemon did not notice the client leaving:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = d.client(&["run", "busybox", "echo", "still here"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "still here\n".to_string()), "{}", stderr(&out));
    // No container of the killed client is left: its sleep is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ps = Command::new("pgrep").args(["-x", "-f", &sleep]).output().unwrap();
        if !ps.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the killed client's container still runs: {}", stdout(&ps));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn restart_keeps_the_store_and_one_daemon_per_root() {
    let mut d = Daemon::start(true, &[]);
    assert!(d.client(&["tag", "busybox", "kept:1"]).status.success());
    // A second daemon on the same root is refused.
    let other = tempfile::tempdir().unwrap();
    let out = kiln(&d.root, &["serve", "-H", &format!("unix://{}/other.sock", other.path().display())]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another kiln daemon already serves"), "{}", stderr(&out));
    assert!(d.stop(), "SIGTERM exits 0:\n{}", d.log());
    assert!(!d.socket.exists(), "the socket is removed on exit");
    d.restart(&[]);
    let out = d.client(&["images"]);
    assert!(stdout(&out).contains("kept"), "{}", stdout(&out));
}

#[test]
fn sigterm_lets_a_running_request_finish() {
    let mut d = Daemon::start(true, &[]);
    let client = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--host", &d.host(), "run", "busybox", "sh", "-c", "sleep 2; echo finished"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let out = client.wait_with_output().unwrap();
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "finished\n".to_string()), "{}\n{}", stderr(&out), d.log());
    assert!(d.stop(), "{}", d.log());
    assert!(d.log().contains("SIGTERM: draining"), "{}", d.log());
}

#[test]
fn sigterm_cancels_what_outlives_the_drain_timeout() {
    let mut d = Daemon::start(true, &["--drain-timeout", "1"]);
    let client = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--host", &d.host(), "run", "busybox", "sleep", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    assert!(d.stop(), "{}", d.log());
    assert!(started.elapsed() < Duration::from_secs(15), "stop took {:?}", started.elapsed());
    let out = client.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "the cancelled run must not look successful");
    assert!(d.log().contains("drain timeout"), "{}", d.log());
}

#[test]
fn pull_and_push_through_the_daemon() {
    if !common::have("docker-registry", "pull_and_push_through_the_daemon") || !common::have("skopeo", "pull_and_push_through_the_daemon") {
        return;
    }
    let reg = TestRegistry::with_busybox();
    // --insecure-registry is a global flag: it works after `serve` too.
    let mut d = Daemon::start(false, &["--insecure-registry", &reg.addr]);
    let source = format!("{}/library/busybox:latest", reg.addr);
    let client = |d: &Daemon, args: &[&str]| d.client(args);
    let out = client(&d, &["pull", &source]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("{source}: pulled sha256:")), "{}", stdout(&out));
    assert!(stdout(&out).contains("downloaded)"), "{}", stdout(&out));
    let target = format!("{}/daemon/copy:v1", reg.addr);
    assert!(client(&d, &["tag", &source, &target]).status.success());
    let out = client(&d, &["push", &target]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("{target}: digest: sha256:")), "{}", stdout(&out));
    // What the daemon pushed is pullable by an embedded kiln elsewhere.
    let other = tempfile::tempdir().unwrap();
    let pulled = kiln_ok(other.path(), &["--insecure-registry", &reg.addr, "pull", &target]);
    assert!(pulled.contains("pulled sha256:"), "{pulled}");
    // A push to a registry that is not there fails with exit code 1 and a message.
    assert!(client(&d, &["tag", &source, "127.0.0.1:1/nothing:v1"]).status.success());
    let out = client(&d, &["push", "127.0.0.1:1/nothing:v1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("kiln: "), "{}", stderr(&out));
    assert!(d.stop());
}

#[test]
fn tcp_needs_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Plain TCP is refused outright.
    let out = kiln(&dir.path().join("root"), &["serve", "-H", &format!("tcp://127.0.0.1:{port}")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("need mutual TLS"), "{}", stderr(&out));
    if !common::have("openssl", "tcp_needs_mutual_tls") {
        return;
    }
    let certs = dir.path().join("certs");
    let rogue = dir.path().join("rogue");
    make_certs(&certs);
    make_certs(&rogue);
    let root = dir.path().join("root");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(&root)
        .args(["serve", "-H", &format!("tcp://127.0.0.1:{port}")])
        .arg("--tlscert")
        .arg(certs.join("server-cert.pem"))
        .arg("--tlskey")
        .arg(certs.join("server-key.pem"))
        .arg("--tlscacert")
        .arg(certs.join("ca.pem"))
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = format!("tcp://127.0.0.1:{port}");
    let client = |cert_dir: Option<&std::path::Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["--host", &host, "images", "-q"]);
        c.env_remove("KILN_TLS_CERT").env_remove("KILN_TLS_KEY").env_remove("KILN_TLS_CACERT");
        match cert_dir {
            Some(d) => c.env("KILN_CERT_PATH", d),
            None => c.env_remove("KILN_CERT_PATH"),
        };
        c.output().unwrap()
    };
    let ok = client(Some(&certs));
    assert!(ok.status.success(), "right client cert: {}", stderr(&ok));
    // A client whose certificate another CA signed (and which trusts that CA).
    let refused = client(Some(&rogue));
    assert_eq!(refused.status.code(), Some(1));
    // A client with the right CA but a foreign certificate.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(certs.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(rogue.join("cert.pem"), mixed.join("cert.pem")).unwrap();
    std::fs::copy(rogue.join("key.pem"), mixed.join("key.pem")).unwrap();
    let refused2 = client(Some(&mixed));
    assert_eq!(refused2.status.code(), Some(1), "{}", stdout(&refused2));
    let none = client(None);
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("TLS"), "{}", stderr(&none));
    // A raw TCP client without a certificate gets no HTTP answer at all.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"GET /v1/_ping HTTP/1.0\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(!String::from_utf8_lossy(&buf).contains("OK"), "plain HTTP must not be served");
    }
    assert!(client(Some(&certs)).status.success(), "the daemon is still up");
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    assert!(serve.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("TLS handshake refused"), "{log}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl.
fn make_certs(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=kiln-test-ca 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null");
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile server.ext 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout key.pem -out client.csr -subj /CN=kiln-client 2>/dev/null");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    sh("openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out cert.pem -days 2 -extfile client.ext 2>/dev/null");
}

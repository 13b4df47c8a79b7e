//! Build steps run in network namespaces lent by a pool (needs root and
//! busybox-static): consecutive steps share one, concurrent steps never
//! do, and a namespace a step left a socket in is not lent again.

mod runtime_common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::executor::ContainerExecutor;
use kiln_engine::runtime::{NetnsPool, NetworkMode};
use kiln_solver::{ExecRequest, Executor};
use runtime_common::{Capture, Scratch, wait_for};

/// Prints the container's network namespace (`net:[<inode>]`) first.
const PRINT_NS: &str = "readlink /proc/self/ns/net; ";

/// This process's network namespace, as [`PRINT_NS`] prints it.
fn host_ns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Run `script` as a build step on `base`; (its namespace, the rest of
/// its output). Fails the test unless it exits 0.
async fn step(exec: &ContainerExecutor, s: &Scratch, base: &Path, name: &str, script: &str) -> (String, String) {
    let rootfs = s.rootfs(vec![base.to_path_buf()], name);
    let req = ExecRequest {
        lower: rootfs.lower,
        upper: rootfs.upper,
        work: rootfs.work,
        args: vec!["/bin/sh".into(), "-c".into(), format!("{PRINT_NS}{script}")],
        env: Vec::new(),
        cwd: "/".into(),
        user: String::new(),
        network: NetworkMode::Default,
        mounts: Vec::new(),
        hostname: "step".into(),
    };
    let cap = Capture::default();
    let code = exec.exec(req, cap.sink()).await.unwrap();
    let out = cap.out();
    assert_eq!(code, 0, "step {name}: stdout {out:?}, stderr {:?}", cap.err());
    let (ns, rest) = out.split_once('\n').unwrap_or((&out, ""));
    assert!(ns.starts_with("net:["), "step {name}: {out:?}");
    assert_ne!(ns, host_ns(), "step {name} ran in the host's namespace");
    (ns.to_string(), rest.to_string())
}

/// Shell: wait up to 5 s until something listens on `port` in this
/// namespace, then print `what` (nothing if it never does).
fn when_listening(port: u16, what: &str) -> String {
    format!(
        "for i in $(seq 100); do netstat -ltn | grep -q ':{port} ' && break; sleep 0.05; done; \
         netstat -ltn | grep -q ':{port} ' && echo {what}"
    )
}

/// Shell: bind `port` (busybox `nc -l`), print `bound` once it listens,
/// stop it; `extra` runs while it listens.
fn bind(port: u16, extra: &str) -> String {
    format!("nc -l -p {port} >/dev/null & p=$!; {}; {extra} kill $p", when_listening(port, "bound"))
}

fn setup() -> (Scratch, PathBuf, ContainerExecutor) {
    setup_with_zygote(true)
}

/// With shims forked by a zygote (the namespace goes in its request) or
/// exec'd (`__container-shim --netns`).
fn setup_with_zygote(zygote: bool) -> (Scratch, PathBuf, ContainerExecutor) {
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let exec = ContainerExecutor::with_shim(s.shim().with_zygote(zygote));
    (s, base, exec)
}

/// Wait until the pool holds `n` idle namespaces.
fn wait_idle(pool: &NetnsPool, n: usize) {
    wait_for(&format!("{n} idle namespaces (have {})", pool.idle()), || pool.idle() == n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_steps_share_a_namespace_with_lo_up() {
    require_containers!();
    consecutive_steps_share(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_steps_share_a_namespace_with_exec_shims() {
    require_containers!();
    consecutive_steps_share(false).await;
}

async fn consecutive_steps_share(zygote: bool) {
    let (s, base, exec) = setup_with_zygote(zygote);
    let pool = exec.netns_pool().expect("a pool (KILN_NETNS_POOL unset)");
    // The first step finds the pool empty: it makes its own, as `kiln
    // run` does, while a helper makes one for the pool.
    let (first, _) = step(&exec, &s, &base, "first", "").await;
    wait_idle(pool, 1);
    // Also how many ICMP messages the namespace got before this ping.
    let lo = "awk '/^Icmp: [0-9]/ {print \"icmp\", $2}' /proc/net/snmp; \
              ping -c 1 -W 2 127.0.0.1 >/dev/null && echo lo-up; ip -o link show lo";
    let (second, out2) = step(&exec, &s, &base, "second", lo).await;
    // Given back once the check found no socket in it (`ip` and `ping`
    // closed theirs).
    wait_idle(pool, 1);
    let (third, out3) = step(&exec, &s, &base, "third", lo).await;
    wait_idle(pool, 1);
    assert_ne!(first, second, "the first step's own namespace was pooled");
    assert_eq!(second, third, "consecutive steps did not share the pooled namespace");
    // The third step saw the second one's ping.
    assert!(out2.starts_with("icmp 0\nlo-up\n"), "{out2:?}");
    assert!(out3.starts_with("icmp 2\nlo-up\n"), "{out3:?}");
    for out in [out2, out3] {
        assert!(out.contains("<LOOPBACK,UP"), "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_get_distinct_namespaces() {
    require_containers!();
    let (s, base, exec) = setup();
    let exec = Arc::new(exec);
    let pool = exec.netns_pool().expect("a pool (KILN_NETNS_POOL unset)").clone();
    let round = |r: usize| {
        let (exec, s, base) = (exec.clone(), &s, &base);
        async move {
            // Both bind the same port while both run.
            let script = bind(8080, "sleep 0.3;");
            let (name_a, name_b) = (format!("a{r}"), format!("b{r}"));
            let (a, b) = tokio::join!(
                step(&exec, s, base, &name_a, &script),
                step(&exec, s, base, &name_b, &script)
            );
            assert_ne!(a.0, b.0, "round {r}: two running steps shared a namespace");
            assert_eq!((a.1.as_str(), b.1.as_str()), ("bound\n", "bound\n"), "round {r}");
            [a.0, b.0]
        }
    };
    round(0).await;
    // Both found the pool empty and ran in namespaces of their own; one
    // was made for each meanwhile.
    wait_idle(&pool, 2);
    let second = round(1).await;
    wait_idle(&pool, 2);
    let third = round(2).await;
    let (mut second, mut third) = (second.to_vec(), third.to_vec());
    second.sort();
    third.sort();
    assert_eq!(second, third, "the pooled namespaces were not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_left_with_a_time_wait_is_not_lent_again() {
    require_containers!();
    let (s, base, exec) = setup();
    let pool = exec.netns_pool().expect("a pool (KILN_NETNS_POOL unset)");
    step(&exec, &s, &base, "warm", "").await;
    wait_idle(pool, 1);
    // A connection to port 8080 over lo, closed: the side that closed
    // first keeps a TIME_WAIT, which the kernel counts in sockstat's `tw`
    // (listing it in /proc/net/tcp can miss it while the host's TCP tables
    // change under the read). Connecting until the listener is there: it
    // may start late on a busy host.
    let time_wait = "nc -l -p 8080 -e true & \
                     for i in $(seq 100); do nc -w 2 127.0.0.1 8080 </dev/null 2>/dev/null && break; sleep 0.05; done; \
                     wait; grep -q '^TCP:.* tw [1-9]' /proc/net/sockstat && echo time-wait";
    let (_, out) = step(&exec, &s, &base, "left", time_wait).await;
    assert_eq!(out, "time-wait\n", "the step made no TIME_WAIT");
    // The check runs on a helper thread: give it ample time.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(pool.idle(), 0, "a namespace with a TIME_WAIT was pooled");
    // TCP connections this namespace made before: none in a fresh one
    // (comparing namespace inodes could not tell: a gone namespace's
    // number is given to the next one made).
    let opens = "awk '/^Tcp: [0-9]/ {print \"opened\", $6}' /proc/net/snmp; ";
    let (_, out) = step(&exec, &s, &base, "next", &format!("{opens}{}", bind(8080, ""))).await;
    assert_eq!(out, "opened 0\nbound\n", "the TIME_WAIT namespace was lent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_of_a_daemonized_process_does_not_reach_the_next_step() {
    require_containers!();
    let (s, base, exec) = setup();
    let pool = exec.netns_pool().expect("a pool (KILN_NETNS_POOL unset)");
    step(&exec, &s, &base, "warm", "").await;
    wait_idle(pool, 1);
    // The step's shell exits while its daemonized child still listens:
    // it dies with the container's pid namespace.
    let daemon = format!("(nc -l -p 8081 >/dev/null &); {}", when_listening(8081, "listening"));
    let (_, out) = step(&exec, &s, &base, "daemon", &daemon).await;
    assert_eq!(out, "listening\n");
    for i in 0..3 {
        let (_, out) = step(&exec, &s, &base, &format!("next{i}"), &bind(8081, "")).await;
        assert_eq!(out, "bound\n", "step {i} after the daemon could not bind its port");
    }
}

/// Run `f` on a thread inside the network namespace at `path`.
fn inside<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(path).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// The pool's check, without containers: a namespace holding a socket or
/// a TIME_WAIT is closed, a clean one kept.
#[test]
fn the_pool_keeps_only_namespaces_without_sockets() {
    require_containers!();
    let pool = NetnsPool::new();
    // Empty: nothing to lend, one is made for the next taker.
    let first = pool.take();
    assert_eq!(first.path(), None);
    wait_idle(&pool, 1);
    drop(first);

    // A listener still open when it comes back.
    let lease = pool.take();
    let path = lease.path().expect("a pooled namespace");
    let (listener, ns_lo) = inside(&path, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (l, std::fs::read_link("/proc/thread-self/ns/net").unwrap())
    });
    assert_ne!(ns_lo.to_string_lossy(), host_ns());
    assert!(!lease.give_back().unwrap().join().unwrap(), "pooled with a listener open");
    drop(listener);
    assert_eq!(pool.idle(), 0);

    // A TIME_WAIT after all sockets were closed.
    drop(pool.take()); // empty again: makes one
    wait_idle(&pool, 1);
    let lease = pool.take();
    inside(&lease.path().unwrap(), || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        drop(server); // the side that closes first keeps the TIME_WAIT
        drop(client);
        drop(l);
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    assert!(!lease.give_back().unwrap().join().unwrap(), "pooled with a TIME_WAIT");

    // Clean: kept, and lent again.
    drop(pool.take());
    wait_idle(&pool, 1);
    let lease = pool.take();
    let path = lease.path().unwrap();
    let ino = std::fs::metadata(&path).unwrap();
    assert!(lease.give_back().unwrap().join().unwrap(), "a clean namespace was not pooled");
    assert_eq!(pool.idle(), 1);
    let again = pool.take();
    let again_ino = std::fs::metadata(again.path().unwrap()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((ino.dev(), ino.ino()), (again_ino.dev(), again_ino.ino()));
}

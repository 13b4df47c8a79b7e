//! `kiln build` runs its RUN steps in network namespaces lent by a pool:
//! consecutive steps share one (see `netns_pool.rs` for the pool's rules),
//! unless `KILN_NETNS_POOL=0`.

mod common;

use common::{TestRegistry, can_run_containers, kiln_ok};

#[test]
fn run_steps_of_a_build_share_a_network_namespace() {
    if !can_run_containers("RUN steps' network namespaces", &["docker-registry"]) {
        return;
    }
    let reg = TestRegistry::with_busybox();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    const STEPS: usize = 6;
    let mut dockerfile = String::from("FROM busybox\n");
    for i in 1..=STEPS {
        // ICMP messages this namespace received before this step's ping:
        // 0 in a fresh one, more in one an earlier step pinged in (namespace
        // inode numbers are reused once one is gone: they cannot tell).
        dockerfile.push_str(&format!(
            "RUN awk '/^Icmp: [0-9]/ {{print $2}}' /proc/net/snmp > /icmp{i}; ping -c 1 -W 2 127.0.0.1 >/dev/null\n"
        ));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let mirror = format!("docker.io=http://{}", reg.addr);
    let ctx_s = ctx.to_str().unwrap();
    // How many steps ran in a namespace an earlier step had used.
    let reused = |tag: &str| -> usize {
        let files: Vec<String> = (1..=STEPS).map(|i| format!("/icmp{i}")).collect();
        let mut args = vec!["run", "--rm", tag, "cat"];
        args.extend(files.iter().map(String::as_str));
        let out = kiln_ok(&root, &args);
        let counts: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(counts.len(), STEPS, "{out}");
        counts.iter().filter(|&&n| n > 0).count()
    };

    kiln_ok(&root, &["--registry-mirror", &mirror, "build", "-q", "-t", "netns:1", ctx_s]);
    let pooled = reused("netns:1");
    // The first step runs in a fresh one (the pool is empty then), most of
    // the rest in the one made meanwhile.
    assert!(pooled > 0, "no step of {STEPS} reused a namespace");

    // Without the pool every step has its own.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_NETNS_POOL", "0")
        .arg("--root")
        .arg(&root)
        .args(["--registry-mirror", &mirror, "build", "-q", "--no-cache", "-t", "netns:2", ctx_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(reused("netns:2"), 0, "KILN_NETNS_POOL=0 still reused namespaces");
    println!("{pooled} of {STEPS} steps reused a namespace with the pool, none without");
}

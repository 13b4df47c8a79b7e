//! `kiln build` runs its RUN steps in network namespaces lent by a pool:
//! consecutive steps share one (see `netns_pool.rs` for the pool's rules).

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
        dockerfile.push_str(&format!("RUN readlink /proc/self/ns/net > /ns{i}\n"));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let mirror = format!("docker.io=http://{}", reg.addr);
    let ctx_s = ctx.to_str().unwrap();
    kiln_ok(&root, &["--registry-mirror", &mirror, "build", "-q", "-t", "netns:1", ctx_s]);
    // Read back what each step saw (`kiln run` has a namespace of its own).
    let out = kiln_ok(&root, &["run", "--rm", "netns:1", "sh", "-c", "cat /ns*; readlink /proc/self/ns/net"]);
    let seen: Vec<&str> = out.lines().collect();
    assert_eq!(seen.len(), STEPS + 1, "{out}");
    let (steps, run) = seen.split_at(STEPS);
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    for ns in steps {
        assert!(ns.starts_with("net:["), "{out}");
        assert_ne!(*ns, host.to_string_lossy(), "a step ran in the host's namespace:\n{out}");
        assert_ne!(ns, &run[0], "`kiln run` got a build step's namespace:\n{out}");
    }
    let mut distinct = steps.to_vec();
    distinct.sort();
    distinct.dedup();
    // The first step runs in a fresh one (the pool is empty then); the
    // rest normally all share the one made meanwhile.
    assert!(distinct.len() < STEPS, "no two of {STEPS} consecutive steps shared a namespace:\n{out}");
    println!("{STEPS} steps ran in {} namespaces", distinct.len());
}

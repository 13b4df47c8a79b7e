//! Scheduler and cache behaviour with a fake executor.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_solver::{Event, EventSink, SolveRequest};

fn request(def: kiln_frontend::Definition, ctx: Option<&std::path::Path>) -> SolveRequest {
    SolveRequest { definition: def, locals: ctx.map(locals).unwrap_or_default(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_ops_run_concurrently() {
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    let a = g.run(s, "sleep 400 ; write /a A", 2);
    let b = g.run(s, "sleep 400 ; write /b B", 3);
    g.merge(vec![a, b]);
    let t = Instant::now();
    let out = h.solver.solve(request(g.def, None)).await.unwrap();
    let elapsed = t.elapsed();
    let runs = h.exec.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2);
    // Overlap: each started before the other ended.
    assert!(runs[0].start < runs[1].end.unwrap() && runs[1].start < runs[0].end.unwrap(), "runs did not overlap");
    assert!(elapsed < Duration::from_millis(750), "took {elapsed:?}, expected about 400ms");
    assert_eq!(out.layers.len(), 2);
    assert_eq!(read_merged(&h, &out.layers, "a").as_deref(), Some("A"));
    assert_eq!(read_merged(&h, &out.layers, "b").as_deref(), Some("B"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_ops_in_concurrent_solves_run_once() {
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    let a = g.run(s, "sleep 300 ; write /x 1", 2);
    g.run(a, "write /y 2", 3);
    let (r1, r2) = tokio::join!(h.solver.solve(request(g.def.clone(), None)), h.solver.solve(request(g.def.clone(), None)));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1, r2);
    assert_eq!(h.exec.count(), 2, "each distinct op executes once: {:?}", h.exec.args());
}

#[tokio::test]
async fn resolve_hits_the_cache_and_persists_across_solvers() {
    let h = harness();
    h.images.add("docker.io/library/base:1", "sha256:1111", vec![vec![("etc/os", "base")]]);
    let mut g = Graph::default();
    let i = g.image("docker.io/library/base:1");
    g.run(i, "write /out built", 2);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let first = h.solver.solve(SolveRequest { events: EventSink(Some(tx)), ..request(g.def.clone(), None) }).await.unwrap();
    assert_eq!(h.exec.count(), 1);
    let mut saw_done = false;
    while let Ok(e) = rx.try_recv() {
        saw_done |= matches!(e, Event::Done { ref name, .. } if name.starts_with("RUN"));
    }
    assert!(saw_done);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let again = h.reopen().solve(SolveRequest { events: EventSink(Some(tx)), ..request(g.def.clone(), None) }).await.unwrap();
    assert_eq!(h.exec.count(), 1, "nothing re-executed");
    assert_eq!(first, again);
    let mut cached = 0;
    while let Ok(e) = rx.try_recv() {
        cached += matches!(e, Event::Cached { .. }) as usize;
    }
    assert_eq!(cached, 1);
    assert_eq!(read_merged(&h, &again.layers, "etc/os").as_deref(), Some("base"));
    assert_eq!(read_merged(&h, &again.layers, "out").as_deref(), Some("built"));

    // --no-cache executes again; a moved tag (new manifest digest) too.
    h.solver.solve(SolveRequest { no_cache: true, ..request(g.def.clone(), None) }).await.unwrap();
    assert_eq!(h.exec.count(), 2);
    h.images.add("docker.io/library/base:1", "sha256:2222", vec![vec![("etc/os", "base2")]]);
    h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    assert_eq!(h.exec.count(), 3);
}

#[tokio::test]
async fn a_missing_snapshot_is_a_cache_miss() {
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    g.run(s, "write /x 1", 2);
    let out = h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    h.store.snapshots.remove(&out.layers[0]).unwrap();
    h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    assert_eq!(h.exec.count(), 2);
}

/// COPY a.txt + RUN, and in parallel COPY b.txt + RUN, merged.
fn two_branches(g: &mut Graph, chmod: Option<u32>) {
    let s = g.scratch();
    let ctx = g.context(&[]);
    let mut ca = copy(&["a.txt"], "/a.txt");
    ca.mode = chmod;
    let ca = g.copy(s, ctx, ca, 2);
    let ra = g.run(ca, "write /ra done", 3);
    let cb = g.copy(s, ctx, copy(&["b.txt"], "/b.txt"), 4);
    let rb = g.run(cb, "write /rb done", 5);
    g.merge(vec![ra, rb]);
}

#[tokio::test]
async fn touch_does_not_reexecute_and_one_file_change_reexecutes_only_dependants() {
    let h = harness();
    let ctx = h.context();
    std::fs::write(ctx.join("a.txt"), "a").unwrap();
    std::fs::write(ctx.join("b.txt"), "b").unwrap();
    let mut g = Graph::default();
    two_branches(&mut g, None);
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 2);

    // Touch both files: new mtime/ctime, same content.
    std::thread::sleep(Duration::from_millis(20));
    for f in ["a.txt", "b.txt"] {
        std::fs::write(ctx.join(f), std::fs::read(ctx.join(f)).unwrap()).unwrap();
    }
    h.reopen().solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 2, "touch-only re-executed something");

    std::fs::write(ctx.join("b.txt"), "b changed").unwrap();
    let out = h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 3);
    assert_eq!(h.exec.args()[2].join(" "), "write /rb done", "only the b branch ran again");
    assert_eq!(read_merged(&h, &out.layers, "b.txt").as_deref(), Some("b changed"));
    assert_eq!(read_merged(&h, &out.layers, "a.txt").as_deref(), Some("a"));
}

#[tokio::test]
async fn chmod_of_a_context_file_misses_unless_copy_sets_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let h = harness();
    let ctx = h.context();
    std::fs::write(ctx.join("a.txt"), "a").unwrap();
    std::fs::write(ctx.join("b.txt"), "b").unwrap();
    let mut g = Graph::default();
    two_branches(&mut g, Some(0o640));
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 2);
    std::fs::set_permissions(ctx.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 2, "--chmod overrides the mode, so a chmod'd source still hits");
    std::fs::set_permissions(ctx.join("b.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 3, "without --chmod the mode is content");
}

#[tokio::test]
async fn ignored_files_do_not_affect_keys() {
    let h = harness();
    let ctx = h.context();
    std::fs::write(ctx.join("app.c"), "int main;").unwrap();
    std::fs::write(ctx.join("debug.log"), "1").unwrap();
    let mut g = Graph::default();
    let s = g.scratch();
    let c = g.context(&["*.log"]);
    let cp = g.copy(s, c, copy(&["."], "/src/"), 2);
    g.run(cp, "write /built yes", 3);
    let out = h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert!(read_merged(&h, &out.layers, "src/debug.log").is_none(), "ignored file copied");
    assert_eq!(read_merged(&h, &out.layers, "src/app.c").as_deref(), Some("int main;"));
    std::fs::write(ctx.join("debug.log"), "2").unwrap();
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_cancels_the_rest_and_names_the_op() {
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    let slow = g.run(s, "sleep 3000 ; write /slow 1", 2);
    // The failing op waits a little so the slow one is surely running.
    let bad = g.run(s, "sleep 200 ; echo compiling ; echo error: boom ; fail 2", 7);
    g.merge(vec![slow, bad]);
    let t = Instant::now();
    let err = h.solver.solve(request(g.def, None)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(1500), "did not cancel: {:?}", t.elapsed());
    assert_eq!(err.op, "RUN sleep 200 ; echo compiling ; echo error: boom ; fail 2");
    assert_eq!(err.line, Some(7));
    assert_eq!(err.log_tail, ["compiling", "error: boom"]);
    assert!(err.message.contains("exit code: 2"), "{}", err.message);
    let shown = err.to_string();
    assert!(shown.contains("line 7") && shown.contains("error: boom"), "{shown}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let runs = h.exec.runs.lock().unwrap().clone();
    let slow_run = runs.iter().find(|r| r.req.args[1] == "3000").expect("slow op started");
    assert!(slow_run.end.is_none(), "slow op ran to the end after the failure");
}

#[tokio::test]
async fn dependants_of_a_failed_op_report_the_root_cause() {
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    let ctx = g.context(&[]);
    let c = g.copy(s, ctx, copy(&["missing.txt"], "/"), 3);
    g.run(c, "write /x 1", 4);
    let dir = h.context();
    let err = h.solver.solve(request(g.def, Some(&dir))).await.unwrap_err();
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("missing.txt"), "{}", err.message);
    assert_eq!(h.exec.count(), 0);
}

#[tokio::test]
async fn secrets_reach_only_the_process() {
    use kiln_frontend::graph::{Mount, MountKind};
    let h = harness();
    let mut g = Graph::default();
    let s = g.scratch();
    let mounts = vec![
        Mount {
            target: "/run/secrets/tok".into(),
            kind: MountKind::Secret { id: "tok".into(), env: None, required: true, uid: 0, gid: 0, mode: 0o400 },
        },
        Mount {
            target: String::new(),
            kind: MountKind::Secret { id: "tok".into(), env: Some("TOKEN".into()), required: true, uid: 0, gid: 0, mode: 0 },
        },
    ];
    let args = ["read", "/run/secrets/tok", ";", "write", "/done", "1"].map(String::from).to_vec();
    g.run_with(s, args, mounts, vec![], 2);
    let secrets = |v: &str| std::collections::HashMap::from([("tok".to_string(), v.as_bytes().to_vec())]);
    let out = h
        .solver
        .solve(SolveRequest { secrets: secrets("s3cret-value"), ..request(g.def.clone(), None) })
        .await
        .unwrap();
    let runs = h.exec.runs.lock().unwrap().clone();
    assert_eq!(runs[0].read, [("/run/secrets/tok".to_string(), "s3cret-value".to_string())]);
    assert!(runs[0].req.env.contains(&"TOKEN=s3cret-value".to_string()));
    assert!(runs[0].mount_paths.iter().all(|p| !p.exists()), "secret file left behind");
    assert!(runs[0].mount_paths.iter().all(|p| !p.starts_with(h.store.root())), "secret written into the store");
    // Not in the key: another value still hits.
    let again = h.solver.solve(SolveRequest { secrets: secrets("other"), ..request(g.def.clone(), None) }).await.unwrap();
    assert_eq!(again, out);
    assert_eq!(h.exec.count(), 1);
    // Not in any file of the store.
    for entry in walk(h.store.root()) {
        if entry.is_file() {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains("s3cret-value"), "secret in {}", entry.display());
        }
    }
    // Missing and required: a clear error.
    let err = h.solver.solve(SolveRequest { no_cache: true, ..request(g.def.clone(), None) }).await.unwrap_err();
    assert!(err.message.contains("secret \"tok\" is required"), "{}", err.message);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.symlink_metadata().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn cache_and_bind_mounts() {
    use kiln_frontend::graph::{CacheSharing, Mount, MountKind};
    let h = harness();
    let ctx = h.context();
    std::fs::write(ctx.join("conf"), "from-context").unwrap();
    let mut g = Graph::default();
    let s = g.scratch();
    let c = g.context(&[]);
    let mounts = vec![
        Mount { target: "/conf".into(), kind: MountKind::Bind { input: 1, source: "conf".into(), readwrite: false } },
        Mount {
            target: "/cache".into(),
            kind: MountKind::Cache { id: "go/build".into(), sharing: CacheSharing::Locked, from: None, uid: 0, gid: 0, mode: 0o755, readonly: false },
        },
    ];
    let args = ["read", "/conf", ";", "write", "/x", "1"].map(String::from).to_vec();
    g.run_with(s, args, mounts, vec![c], 2);
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    let runs = h.exec.runs.lock().unwrap().clone();
    assert_eq!(runs[0].read[0].1, "from-context");
    let cache = runs[0].req.mounts.iter().find(|m| m.target == "/cache").unwrap();
    let kiln_solver::HostMountSource::Bind(dir) = &cache.source else { panic!() };
    assert!(dir.starts_with(h.store.root().join("cache-mounts")) && dir.is_dir(), "{}", dir.display());
    assert!(runs[0].req.mounts[0].readonly);
    // The bound file is content of the key: changing it re-executes.
    std::fs::write(ctx.join("conf"), "changed").unwrap();
    h.solver.solve(request(g.def.clone(), Some(&ctx))).await.unwrap();
    assert_eq!(h.exec.count(), 2);
}

#[tokio::test]
async fn prune_removes_unreferenced_then_all() {
    use kiln_solver::gc;
    let h = harness();
    h.images.add("docker.io/library/base:1", "sha256:1111", vec![vec![("etc/os", "base")]]);
    let mut g = Graph::default();
    let i = g.image("docker.io/library/base:1");
    g.run(i, "write /out built", 2);
    h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    let u = gc::usage(&h.store).unwrap();
    assert_eq!((u.records, u.snapshots), (1, 2));
    assert!(u.snapshot_bytes > 0);
    // Records keep their whole chain (base layer included) alive.
    let r = gc::prune(&h.store, &gc::PruneOptions::default()).unwrap();
    assert_eq!((r.records, r.snapshots), (0, 0));
    h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    assert_eq!(h.exec.count(), 1, "still cached after a default prune");
    let r = gc::prune(&h.store, &gc::PruneOptions { all: false, keep_bytes: Some(0) }).unwrap();
    assert_eq!((r.records, r.snapshots), (1, 2));
    h.solver.solve(request(g.def.clone(), None)).await.unwrap();
    assert_eq!(h.exec.count(), 2, "pruned entries are rebuilt");
    gc::prune(&h.store, &gc::PruneOptions { all: true, keep_bytes: None }).unwrap();
    assert_eq!(gc::usage(&h.store).unwrap(), gc::Usage::default());
}

/// A loopback HTTP server answering each request with the next body.
fn http_server(bodies: Vec<&'static str>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for body in bodies {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    addr
}

#[tokio::test]
async fn add_url_keys_on_content_and_checks_checksums() {
    use kiln_frontend::graph::{Op, SourceOp};
    let h = harness();
    let addr = http_server(vec!["v1", "v1", "v2", "v2"]);
    let def = |checksum: Option<String>| {
        let mut g = Graph::default();
        let s = g.scratch();
        let src = g.add(
            Op::Source(SourceOp::Http { url: format!("http://{addr}/tool.sh"), checksum, filename: "tool.sh".into(), mode: None }),
            vec![],
            "ADD http",
            2,
        );
        let c = g.copy(s, src, copy(&["/tool.sh"], "/usr/bin/"), 2);
        g.run(c, "write /ran yes", 3);
        g.def
    };
    let out = h.solver.solve(request(def(None), None)).await.unwrap();
    assert_eq!(read_merged(&h, &out.layers, "usr/bin/tool.sh").as_deref(), Some("v1"));
    h.solver.solve(request(def(None), None)).await.unwrap();
    assert_eq!(h.exec.count(), 1, "same download: cached");
    let out = h.solver.solve(request(def(None), None)).await.unwrap();
    assert_eq!(h.exec.count(), 2, "new content: re-executed");
    assert_eq!(read_merged(&h, &out.layers, "usr/bin/tool.sh").as_deref(), Some("v2"));
    let err = h.solver.solve(request(def(Some("sha256:0000".into())), None)).await.unwrap_err();
    assert!(err.message.contains("checksum mismatch"), "{}", err.message);
}

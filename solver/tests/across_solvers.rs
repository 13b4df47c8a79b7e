//! Two solvers on one store root, as two kiln processes would have: they
//! share no in-process state (in-flight map, mutexes, store handle), only
//! the store's files and locks. And, for comparison, two solves on one
//! solver (as in the daemon), which share work in memory.

mod common;

use std::time::Instant;

use common::*;
use kiln_frontend::graph::{CacheSharing, Mount, MountKind};
use kiln_solver::{Event, EventSink, SolveRequest, Solver};

/// Solve `def` on `solver`, returning the result and every event.
async fn solve_collecting(solver: &Solver, def: kiln_frontend::Definition) -> (kiln_solver::SolveOutput, Vec<Event>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = solver
        .solve(SolveRequest { definition: def, events: EventSink(Some(tx)), ..Default::default() })
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (out, events)
}

fn names(events: &[Event], kind: fn(&Event) -> Option<&str>) -> Vec<String> {
    events.iter().filter_map(kind).map(str::to_string).collect()
}

fn started(e: &Event) -> Option<&str> {
    match e {
        Event::Started { name, .. } => Some(name),
        _ => None,
    }
}

fn cached(e: &Event) -> Option<&str> {
    match e {
        Event::Cached { name, .. } => Some(name),
        _ => None,
    }
}

/// Both solves on `a` and `b` ran each op of a two-op graph once and the
/// other solve reported it cached.
async fn each_op_started_once_and_cached_once(h: &Harness, a: &Solver, b: &Solver) {
    let mut g = Graph::default();
    let s = g.scratch();
    let x = g.run(s, "sleep 400 ; write /x 1", 2);
    g.run(x, "write /y 2", 3);
    let ((o1, e1), (o2, e2)) = tokio::join!(solve_collecting(a, g.def.clone()), solve_collecting(b, g.def.clone()));
    assert_eq!(o1, o2);
    assert_eq!(h.exec.count(), 2, "each op executes once over both solvers: {:?}", h.exec.args());
    // Each op is started by one solver and reported cached by the other.
    let mut started_all = names(&e1, started);
    started_all.extend(names(&e2, started));
    started_all.sort();
    let mut cached_all = names(&e1, cached);
    cached_all.extend(names(&e2, cached));
    cached_all.sort();
    let ops = vec!["RUN sleep 400 ; write /x 1".to_string(), "RUN write /y 2".to_string()];
    assert_eq!(started_all, ops, "{e1:?}\n{e2:?}");
    assert_eq!(cached_all, ops, "{e1:?}\n{e2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_op_in_flight_in_one_solver_is_waited_for_by_another() {
    let h = harness();
    let other = h.reopen();
    each_op_started_once_and_cached_once(&h, &h.solver, &other).await;
    // The per-key lock files are gone once released.
    let keys = h.store.root().join("locks").join(kiln_solver::solver::KEY_LOCK_DIR);
    assert_eq!(std::fs::read_dir(&keys).map(|d| d.count()).unwrap_or(0), 0, "key locks left behind");
}

fn cache_mount(sharing: CacheSharing) -> Vec<Mount> {
    vec![Mount {
        target: "/cache".into(),
        kind: MountKind::Cache { id: "shared-id".into(), sharing, from: None, uid: 0, gid: 0, mode: 0o755, readonly: false },
    }]
}

/// Two different ops (so both execute), one per solver, on one cache id.
async fn two_solvers_on_one_cache_mount(sharing: CacheSharing) -> (Harness, Vec<Run>) {
    let h = harness();
    let other = h.reopen();
    let def = |tag: &str| {
        let mut g = Graph::default();
        let s = g.scratch();
        let args = ["sleep", "300", ";", "write", "/tag", tag].map(String::from).to_vec();
        g.run_with(s, args, cache_mount(sharing), vec![], 2);
        g.def
    };
    let (r1, r2) = tokio::join!(solve_collecting(&h.solver, def("a")), solve_collecting(&other, def("b")));
    let _ = (r1, r2);
    let runs = h.exec.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2);
    (h, runs)
}

fn overlap(runs: &[Run]) -> bool {
    let end = |r: &Run| r.end.unwrap_or_else(Instant::now);
    runs[0].start < end(&runs[1]) && runs[1].start < end(&runs[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locked_cache_mounts_exclude_across_solvers() {
    let (h, runs) = two_solvers_on_one_cache_mount(CacheSharing::Locked).await;
    assert!(!overlap(&runs), "sharing=locked runs overlapped");
    assert_eq!(runs[0].mount_paths, runs[1].mount_paths, "both use the one cache dir");
    assert!(runs[0].mount_paths[0].starts_with(h.store.root().join("cache-mounts")));
    // The same ops with sharing=shared do overlap: the test can tell.
    let (_h, runs) = two_solvers_on_one_cache_mount(CacheSharing::Shared).await;
    assert!(overlap(&runs), "sharing=shared runs should run at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_cache_mounts_get_their_own_dir_when_busy_in_another_solver() {
    let (h, runs) = two_solvers_on_one_cache_mount(CacheSharing::Private).await;
    assert!(overlap(&runs), "private users do not wait for each other");
    assert_ne!(runs[0].mount_paths, runs[1].mount_paths, "a busy private cache gives the second user its own dir");
    let shared_dir = h.store.root().join("cache-mounts");
    let in_shared = runs.iter().filter(|r| r.mount_paths[0].starts_with(&shared_dir)).count();
    assert_eq!(in_shared, 1, "exactly one user gets the persistent dir: {runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_solve_joining_another_on_the_same_solver_reports_the_op_cached() {
    let h = harness();
    each_op_started_once_and_cached_once(&h, &h.solver, &h.solver).await;
}

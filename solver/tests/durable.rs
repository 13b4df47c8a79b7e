//! Layers are committed without fsyncs and made durable with the step's
//! cache record: a finished solve leaves nothing unsynced.

mod common;

use common::*;
use kiln_solver::SolveRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_solve_makes_every_layer_durable_before_it_returns() {
    let h = harness();
    let ctx = h.context();
    std::fs::write(ctx.join("a.txt"), "A").unwrap();
    for no_cache in [false, true] {
        let mut g = Graph::default();
        let s = g.scratch();
        let c = g.context(&[]);
        let mut top = g.copy(s, c, copy(&["a.txt"], "/"), 2);
        for step in 0..5 {
            top = g.run(top, &format!("write /step{step} {step}"), 3 + step);
        }
        let req = SolveRequest { definition: g.def, locals: locals(&ctx), no_cache, ..Default::default() };
        let out = h.solver.solve(req).await.unwrap();
        assert_eq!(out.layers.len(), 6, "no_cache={no_cache}");
        assert!(h.store.snapshots.unsynced().is_empty(), "no_cache={no_cache}: {:?}", h.store.snapshots.unsynced());
        assert_eq!(read_merged(&h, &out.layers, "step4").as_deref(), Some("4"));
        // The steps' work dirs and locks went with the syncs; the snapshot
        // prepared ahead and not used goes soon after the solve.
        let tmp = h.store.root().join("tmp/snapshots");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_dir(&tmp).unwrap().count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{:?}", std::fs::read_dir(&tmp).unwrap().collect::<Vec<_>>());
        // Each step's record is there, naming the whole chain so far.
        for step in &out.steps {
            let record = h.store.index.get(&step.key).unwrap().expect("recorded");
            let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
            assert_eq!(record["layers"], serde_json::json!(step.layers));
        }
    }
    assert_eq!(h.exec.count(), 10, "the no-cache solve ran every step again");
}

//! The `--cache-from` hook: on a local miss the solver asks the imported
//! cache, reports a hit as CACHED and executes nothing; a failing import
//! makes the step run, with a warning in its log.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use kiln_cache::Store;
use kiln_cache::snapshots::SnapshotMeta;
use kiln_solver::{CacheImport, Event, EventSink, SolveRequest};

/// An imported cache that copies results out of another store (the real
/// one fetches blobs; the solver cannot tell).
struct FromOtherStore {
    from: Arc<Store>,
    to: Arc<Store>,
    records: HashMap<String, Vec<String>>,
    fail: bool,
}

impl std::fmt::Debug for FromOtherStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FromOtherStore({})", self.from.root().display())
    }
}

#[async_trait::async_trait]
impl CacheImport for FromOtherStore {
    async fn load(&self, key: &str) -> anyhow::Result<Option<Vec<String>>> {
        let Some(layers) = self.records.get(key) else { return Ok(None) };
        anyhow::ensure!(!self.fail, "blob sha256:0000 is corrupt");
        for id in layers {
            if self.to.snapshots.exists(id) {
                continue;
            }
            let active = self.to.snapshots.prepare()?;
            let src = self.from.snapshots.path(id);
            for entry in std::fs::read_dir(&src)? {
                let entry = entry?;
                std::fs::copy(entry.path(), active.fs().join(entry.file_name()))?;
            }
            self.to.snapshots.commit(active, id, &SnapshotMeta::default())?;
        }
        Ok(Some(layers.clone()))
    }
}

fn graph() -> Graph {
    let mut g = Graph::default();
    let s = g.scratch();
    let a = g.run(s, "write /a A", 2);
    g.run(a, "write /b B", 3);
    g
}

async fn solve(h: &Harness, g: &Graph, import: Option<Arc<dyn CacheImport>>) -> (kiln_solver::SolveOutput, Vec<Event>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = SolveRequest { definition: g.def.clone(), events: EventSink(Some(tx)), cache_import: import, ..Default::default() };
    let out = h.solver.solve(req).await.unwrap();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (out, events)
}

#[tokio::test]
async fn imported_results_are_cached_not_executed() {
    let (a, b) = (harness(), harness());
    let g = graph();
    let (first, _) = solve(&a, &g, None).await;
    assert_eq!(a.exec.count(), 2);
    assert_eq!(first.steps.len(), 2, "{:?}", first.steps);
    assert_eq!(first.steps[1].key, first.key);
    assert_eq!(first.steps[1].layers, first.layers);

    let records = first.steps.iter().map(|s| (s.key.clone(), s.layers.clone())).collect();
    let import = FromOtherStore {
        from: a.store.clone(),
        to: b.store.clone(),
        records,
        fail: false,
    };
    let (second, events) = solve(&b, &g, Some(Arc::new(import))).await;
    assert_eq!(b.exec.count(), 0, "executed: {:?}", b.exec.args());
    assert_eq!(second.layers, first.layers);
    let cached = events.iter().filter(|e| matches!(e, Event::Cached { .. })).count();
    let started = events.iter().filter(|e| matches!(e, Event::Started { .. })).count();
    assert_eq!((cached, started), (2, 0), "{events:?}");
    assert_eq!(read_merged(&b, &second.layers, "b").as_deref(), Some("B"));

    // The hit is now in B's own index: no import needed any more.
    let (_, events) = solve(&b, &g, None).await;
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Cached { .. })).count(), 2);
    assert_eq!(b.exec.count(), 0);
}

#[tokio::test]
async fn a_failing_import_runs_the_step_with_a_warning() {
    let (a, b) = (harness(), harness());
    let g = graph();
    let (first, _) = solve(&a, &g, None).await;
    let import = FromOtherStore {
        from: a.store.clone(),
        to: b.store.clone(),
        records: first.steps.iter().map(|s| (s.key.clone(), s.layers.clone())).collect(),
        fail: true,
    };
    let (second, events) = solve(&b, &g, Some(Arc::new(import))).await;
    assert_eq!(b.exec.count(), 2);
    assert_eq!(read_merged(&b, &second.layers, "b").as_deref(), Some("B"));
    let warnings: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Log { line, .. } if line.contains("cannot use the imported cache") && line.contains("corrupt")))
        .collect();
    assert_eq!(warnings.len(), 2, "{events:?}");
}

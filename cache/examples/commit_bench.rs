//! Time a build step's snapshot work on its critical path: `prepare` (+
//! the overlay work dir) and the commit, durable (`commit`) or deferred
//! (`commit_deferred`, with `make_durable` and a cache record written on
//! another thread, as the solver does), and deferred with snapshots
//! prepared ahead (`prepare_ahead`).
//!
//! `cargo run --release -p kiln-cache --example commit_bench -- DIR [STEPS]`
//! (DIR: a scratch store root on the filesystem to measure; it is removed).

use std::time::{Duration, Instant};

use kiln_cache::Store;
use kiln_cache::snapshots::SnapshotMeta;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(root: &std::path::Path, steps: usize, deferred: bool, ahead: bool) -> anyhow::Result<(Duration, Duration)> {
    let store = std::sync::Arc::new(Store::open(root)?);
    let _ahead = ahead.then(|| store.snapshots.prepare_ahead());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let syncer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for id in rx {
                store.snapshots.make_durable(&[&id]).unwrap();
                store.index.put(&format!("sha256:{id}"), br#"{"layers":[]}"#).unwrap();
            }
        })
    };
    let (mut prepare, mut commit) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let t0 = Instant::now();
        let active = store.snapshots.prepare()?;
        let work = active.make_work_dir()?;
        prepare.push(t0.elapsed());
        // What the container and overlayfs leave: a file, `work/work`.
        std::fs::create_dir(work.join("work"))?;
        std::fs::write(active.fs().join(format!("step{step}")), format!("step {step}\n"))?;
        let id = format!("{step:064x}");
        let t1 = Instant::now();
        if deferred {
            store.snapshots.commit_deferred(active, &id, &SnapshotMeta::default())?;
            commit.push(t1.elapsed());
            tx.send(id)?;
        } else {
            store.snapshots.commit(active, &id, &SnapshotMeta::default())?;
            commit.push(t1.elapsed());
            store.index.put(&format!("sha256:{id}"), br#"{"layers":[]}"#)?;
        }
        // A step's container runs ~10 ms.
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(tx);
    syncer.join().unwrap();
    Ok((median(prepare), median(commit)))
}

/// The same file-system operations, each timed: where the time goes.
fn breakdown(root: &std::path::Path, steps: usize) -> anyhow::Result<()> {
    use std::fs;
    let (tmp, snaps) = (root.join("tmp"), root.join("snapshots"));
    fs::create_dir_all(&tmp)?;
    fs::create_dir_all(&snaps)?;
    let names = ["lock create", "mkdir s-X", "mkdir fs", "mkdir work", "rmdir work/work+work", "write meta", "rename", "unlink lock"];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for step in 0..steps {
        let dir = tmp.join(format!("s-{step}"));
        let lock = tmp.join(format!("s-{step}.lock"));
        let mut t = Instant::now();
        let mut lap = |i: usize, times: &mut Vec<Vec<Duration>>| {
            times[i].push(t.elapsed());
            t = Instant::now();
        };
        let f = fs::File::create(&lock)?;
        lap(0, &mut times);
        fs::create_dir(&dir)?;
        lap(1, &mut times);
        fs::create_dir(dir.join("fs"))?;
        lap(2, &mut times);
        fs::create_dir(dir.join("work"))?;
        lap(3, &mut times);
        fs::create_dir(dir.join("work/work"))?;
        fs::write(dir.join("fs").join("f"), "x")?;
        std::thread::sleep(Duration::from_millis(10));
        let mut t2 = Instant::now();
        let mut lap = |i: usize, times: &mut Vec<Vec<Duration>>| {
            times[i].push(t2.elapsed());
            t2 = Instant::now();
        };
        fs::remove_dir_all(dir.join("work"))?;
        lap(4, &mut times);
        fs::write(dir.join("meta.json"), "{}")?;
        lap(5, &mut times);
        fs::rename(&dir, snaps.join(format!("{step}")))?;
        lap(6, &mut times);
        fs::remove_file(&lock)?;
        drop(f);
        lap(7, &mut times);
    }
    for (name, t) in names.iter().zip(times) {
        println!("  {name:<22} {:>7.3} ms", median(t).as_secs_f64() * 1e3);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("usage: commit_bench DIR [STEPS]"));
    let steps = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100);
    if args.get(3).is_some_and(|a| a == "breakdown") {
        let root = dir.join("breakdown");
        breakdown(&root, steps)?;
        std::fs::remove_dir_all(&root)?;
        return Ok(());
    }
    for round in 0..3 {
        for (name, deferred, ahead) in [("durable", false, false), ("deferred", true, false), ("ahead", true, true)] {
            let root = dir.join(format!("r{round}-{name}"));
            let (prepare, commit) = run(&root, steps, deferred, ahead)?;
            println!("{name:<9} prepare {:>7.3} ms  commit {:>7.3} ms", prepare.as_secs_f64() * 1e3, commit.as_secs_f64() * 1e3);
            std::fs::remove_dir_all(&root)?;
        }
    }
    Ok(())
}

//! Regression: exporting several gzip layers from inside a small rayon pool
//! must finish. Parallel gzip once queued its blocks on the caller's pool
//! and blocked a worker per layer waiting for them, so with as many layers
//! as threads every worker waited and none compressed.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::snapshot;
use kiln_cache::Store;
use kiln_exporter::{LayerOptions, LayerWriter};

/// Enough pseudo-random text that a layer is many gzip blocks, more than
/// the compressor keeps in flight.
fn filler(seed: u32, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(format!("{x:08x} row {}\n", out.len() % 4099).as_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn gzip_layers_in_a_two_thread_pool_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let layers: Vec<String> = (0..5u32)
        .map(|i| {
            snapshot(&store, &format!("layer{i}"), |fs| {
                std::fs::write(fs.join(format!("data{i}")), filler(i, 3 << 19)).unwrap();
            })
        })
        .collect();
    let root = tmp.path().to_path_buf();
    let (done_tx, done_rx) = mpsc::channel();
    // The export runs on its own thread so a deadlock fails the test on the
    // timeout below instead of hanging the test run.
    std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let store = Store::open(&root).unwrap();
        let result = pool.install(|| LayerWriter::new(&store, LayerOptions::default()).write_chain(&layers));
        let _ = done_tx.send(result.map(|blobs| blobs.len()));
    });
    match done_rx.recv_timeout(Duration::from_secs(120)) {
        Ok(result) => assert_eq!(result.unwrap(), 5),
        Err(_) => panic!("exporting 5 gzip layers in a 2-thread rayon pool did not finish in 120s (deadlock)"),
    }
    drop(tmp);
}

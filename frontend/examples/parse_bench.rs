//! Parse-speed benchmark: the conformance corpus (if `shared/` is beside the
//! repo) and a generated 10,000-instruction Dockerfile, parsed many times on
//! one thread. Run with `cargo run --release -p kiln-frontend --example parse_bench`.

use std::time::Instant;

fn generated(n: usize) -> String {
    let mut s = String::from("# syntax=docker/dockerfile:1\nARG BASE=busybox\nFROM ${BASE} AS build\n");
    for i in 0..n {
        match i % 10 {
            0 => s.push_str(&format!("RUN --mount=type=cache,target=/root/.cache echo step {i} && \\\n    make -j4 target{i}\n")),
            1 => s.push_str(&format!("ENV VAR{i}=\"value {i}\" OTHER{i}=x\n")),
            2 => s.push_str(&format!("COPY --chown=1000:1000 [\"src/{i}\", \"/app/{i}\"]\n")),
            3 => s.push_str(&format!("LABEL org.example.step{i}=\"{i}\"\n")),
            4 => s.push_str(&format!("# a comment for step {i}\nWORKDIR /app/{i}\n")),
            5 => s.push_str(&format!("ARG A{i}=default{i}\n")),
            6 => s.push_str(&format!("RUN <<EOF\necho heredoc {i}\nEOF\n")),
            7 => s.push_str(&format!("CMD [\"/bin/app\", \"--step\", \"{i}\"]\n")),
            8 => s.push_str(&format!("EXPOSE {}/tcp\n", 1000 + i)),
            _ => s.push_str(&format!("ADD https://example.invalid/f{i}.tar.gz /opt/\n")),
        }
    }
    s
}

/// CPU seconds this process has used (user + system, from /proc), so the
/// figure is not skewed by other processes competing for the core.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn bench(name: &str, inputs: &[Vec<u8>], rounds: usize) {
    // Best of five trials: the machine is shared, so the fastest trial is
    // the one least disturbed by other processes.
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..5 {
        let r = trial(inputs, rounds);
        if best.is_none_or(|b| r.1 < b.1) {
            best = Some(r);
        }
    }
    let (secs, cpu) = best.unwrap_or((1.0, 1.0));
    let bytes: usize = inputs.iter().map(Vec::len).sum();
    let mb = (bytes * rounds) as f64 / 1e6;
    let instructions: usize = inputs.iter().filter_map(|i| kiln_frontend::parser::parse(i).ok()).map(|r| r.ast.children.len()).sum();
    println!(
        "{name}: {} files, {bytes} bytes x {rounds} rounds (best of 5): wall {secs:.2}s = {:.1} MB/s, cpu {cpu:.2}s = {:.1} MB/s ({instructions} instructions/round)",
        inputs.len(),
        mb / secs,
        mb / cpu,
    );
}

/// One timed run: (wall seconds, CPU seconds).
fn trial(inputs: &[Vec<u8>], rounds: usize) -> (f64, f64) {
    let mut instructions = 0;
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    for _ in 0..rounds {
        for i in inputs {
            if let Ok(r) = kiln_frontend::parser::parse(i) {
                instructions += r.ast.children.len();
            }
        }
    }
    std::hint::black_box(instructions);
    (start.elapsed().as_secs_f64(), (cpu_seconds() - cpu0).max(0.01))
}

fn main() {
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance/parser");
    let mut corpus = Vec::new();
    for sub in ["testfiles", "testfiles-negative", "testfile-line"] {
        let dir = std::path::Path::new(shared).join(sub);
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = if e.path().is_dir() { e.path().join("Dockerfile") } else { e.path() };
            if let Ok(d) = std::fs::read(&p) {
                corpus.push(d);
            }
        }
    }
    if corpus.is_empty() {
        println!("corpus: skipped because shared/ is not beside the repo");
    } else {
        bench("conformance corpus", &corpus, 3000);
    }
    let big = generated(10_000).into_bytes();
    bench("generated 10,000 instructions", &[big], 60);
}

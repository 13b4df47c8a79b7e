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

fn bench(name: &str, inputs: &[Vec<u8>], rounds: usize) {
    let bytes: usize = inputs.iter().map(Vec::len).sum();
    let mut instructions = 0;
    let start = Instant::now();
    for _ in 0..rounds {
        for i in inputs {
            if let Ok(r) = kiln_frontend::parser::parse(i) {
                instructions += r.ast.children.len();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = (bytes * rounds) as f64 / 1e6;
    println!(
        "{name}: {} files, {bytes} bytes x {rounds} rounds in {secs:.3}s = {:.1} MB/s ({} instructions/round)",
        inputs.len(),
        mb / secs,
        instructions / rounds
    );
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
        bench("conformance corpus", &corpus, 2000);
    }
    let big = generated(10_000).into_bytes();
    bench("generated 10,000 instructions", &[big], 20);
}

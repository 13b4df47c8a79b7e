//! Robustness: the parser, the lexer and lowering never panic, whatever the
//! input. Proptest drives random bytes and random Dockerfile-ish token soup.
//! Case counts are modest here; run longer locally with e.g.
//! `PROPTEST_CASES=200000 cargo test --release -p kiln-frontend --test fuzz`.
//! Coverage-guided cargo-fuzz targets for the same code live in `fuzz/` (see its README).

use kiln_frontend::parser;
use kiln_frontend::shell::{EnvList, Lex};
use kiln_frontend::image::{History, ImageConfig};
use kiln_frontend::{ImageMetaResolver, LowerOptions, Platform};
use proptest::prelude::*;

/// Every image exists and has an ONBUILD trigger taken from the input, so
/// triggers get fuzzed too.
struct FakeResolver(String);

impl ImageMetaResolver for FakeResolver {
    fn resolve(&self, _r: &str, _p: &Platform) -> Result<(ImageConfig, Vec<History>), String> {
        let on_build = if self.0.is_empty() { vec![] } else { vec![self.0.clone()] };
        Ok((ImageConfig { on_build, ..ImageConfig::default() }, vec![History::default()]))
    }
}

const TOKENS: &[&str] = &[
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "LABEL", "CMD", "ENTRYPOINT", "SHELL", "ONBUILD", "HEALTHCHECK",
    "WORKDIR", "USER", "EXPOSE", "VOLUME", "STOPSIGNAL", "MAINTAINER", "AS", "--from=", "--mount=type=", "cache",
    "bind", "secret", "tmpfs", "ssh", "--chown=", "--link", "--network=", "--platform=", "--interval=", " ", " ",
    "\t", "\n", "\n", "\r\n", "\\", "\\\n", "`", "#", "# escape=`\n", "# syntax=x\n", "<<", "<<-", "EOF", "'",
    "\"", "[", "]", ",", "=", "$", "${", "}", ":-", ":+", ":?", "#", "##", "%", "%%", "/", "//", "*", "?", "a",
    "b", "0", "1", "é", "\u{feff}", "\u{0}", "NONE", "CMD", "x=y", "k v", "\nFROM img AS s1\n",
    "\nCOPY --from=base a /b\n", "\nRUN --mount=type=bind,from=base,target=/m true\n", "\nCOPY --link x /y\n",
    "\nWORKDIR w\n", "\nRUN x\n", "\nADD https://h/f.tgz /\n", "--from=0", "--from=s1",
];

fn soup() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..60).prop_map(|v| v.concat())
}

fn check_all(input: &[u8]) {
    let r = parser::parse(input);
    if let Ok(r) = &r {
        let _ = r.ast.dump();
        let _ = serde_json::to_string(&r.ast).unwrap();
    }
    let text = String::from_utf8_lossy(input);
    let trigger: String = text.lines().nth(1).unwrap_or("").to_string();
    let mut opts = LowerOptions { dockerignore: Some(text.to_string()), ..LowerOptions::default() };
    opts.build_args.insert("A".into(), "x".into());
    if let Ok(d) = kiln_frontend::lower(input, &opts, &FakeResolver(trigger)) {
        check_shape(&d);
    }
    let mut prefixed = b"FROM img AS base\n".to_vec();
    prefixed.extend_from_slice(input);
    if let Ok(d) = kiln_frontend::lower(&prefixed, &opts, &FakeResolver(String::new())) {
        check_shape(&d);
    }
    if let Ok(m) = kiln_frontend::dockerignore::Matcher::new(&kiln_frontend::dockerignore::parse(&text)) {
        let _ = m.matches(&text);
    }
    let env = EnvList::from_slice(&["A=1", "B=", "PATH=/bin"]);
    for esc in ['\\', '`'] {
        let mut lex = Lex::new(esc);
        let _ = lex.process_word(&text, &env);
        let _ = lex.process_words(&text, &env);
        lex.raw_quotes = true;
        lex.raw_escapes = true;
        lex.skip_unset_env = true;
        let _ = lex.process_word_with_matches(&text, &env);
    }
    let _ = parser::heredocs_from_line(&text);
    let _ = parser::detect_syntax(&text);
    let _ = kiln_frontend::shell::convert_shell_pattern_to_regex(&text, true, true);
    let _ = kiln_frontend::shell::reverse_pattern(&text);
}

/// The graph invariants the solver relies on: topological order, and every
/// input position an op names exists.
fn check_shape(d: &kiln_frontend::Definition) {
    use kiln_frontend::graph::{FileAction, MountKind, Op};
    assert!(d.target < d.ops.len());
    for (i, n) in d.ops.iter().enumerate() {
        assert!(n.inputs.iter().all(|&j| j < i), "op {i} reads a later op");
        match &n.op {
            Op::Source(_) => assert!(n.inputs.is_empty()),
            Op::Exec(e) => {
                assert!(!n.inputs.is_empty(), "exec needs a rootfs");
                for m in &e.mounts {
                    match &m.kind {
                        MountKind::Bind { input, .. } => assert!(*input < n.inputs.len()),
                        MountKind::Cache { from: Some((input, _)), .. } => assert!(*input < n.inputs.len()),
                        _ => {}
                    }
                }
            }
            Op::File(f) => {
                if let Some(b) = f.base {
                    assert!(b < n.inputs.len());
                }
                for a in &f.actions {
                    if let FileAction::Copy(c) = a {
                        assert!(c.src_input < n.inputs.len());
                    }
                }
            }
            Op::Merge(_) => assert!(n.inputs.len() >= 2),
        }
    }
    let layers = d.image.history.iter().filter(|h| !h.empty_layer).count();
    assert!(layers <= d.image.history.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)))]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_all(&input);
    }

    #[test]
    fn token_soup_never_panics(input in soup()) {
        check_all(input.as_bytes());
    }
}

/// Inputs that once crashed (or nearly did); kept as regressions.
#[test]
fn regressions() {
    for input in [
        &b"FROM a\nRUN <<"[..],
        b"FROM a\nRUN --\xa0x",
        b"FROM a\nHEALTHCHECK \xc2\xa0CMD x",
        b"\xef\xbb\xbf# escape=`\nFROM a\nRUN b `\n",
        b"ONBUILD",
        b"\\",
        b"FROM a\nCOPY <<-\t",
    ] {
        check_all(input);
    }
}

/// Every conformance Dockerfile lowers to a well-formed graph, or fails with
/// a positioned error (some are parser-only oddities BuildKit also rejects
/// when building).
#[test]
fn conformance_dockerfiles_lower_to_well_formed_graphs() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance/parser/testfiles"));
    let Ok(rd) = std::fs::read_dir(dir) else {
        println!("skipped: conformance data not found at {} because shared/ is not beside the repo", dir.display());
        return;
    };
    let (mut ok, mut total) = (0, 0);
    for e in rd.flatten() {
        let Ok(src) = std::fs::read(e.path().join("Dockerfile")) else { continue };
        total += 1;
        match kiln_frontend::lower(&src, &LowerOptions::default(), &FakeResolver(String::new())) {
            Ok(d) => {
                check_shape(&d);
                ok += 1;
            }
            Err(err) => {
                assert!(err.span.is_some(), "{}: error without position: {err}", e.path().display());
                println!("{}: {}", e.file_name().to_string_lossy(), err.to_string().lines().next().unwrap_or(""));
            }
        }
    }
    println!("conformance Dockerfiles lowered: {ok}/{total}");
    assert!(ok * 2 > total, "most conformance Dockerfiles are buildable");
}

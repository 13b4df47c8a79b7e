//! Equivalence with buildah: every case under `testdata/equiv/` is built by
//! `kiln build` and by `buildah build --layers`, and the two images must
//! have the same filesystem (paths, types, modes, uid/gid, symlink targets,
//! file contents — never times) and the same config (Env, Cmd, Entrypoint,
//! WorkingDir, User, ExposedPorts, Volumes, Labels, StopSignal, Healthcheck,
//! OnBuild). Where BuildKit itself differs from buildah, the test follows
//! BuildKit; every such rule is in [`IGNORES`] and `testdata/equiv/DIFFERENCES.md`.
//! Secret values must appear nowhere in kiln's image (layers, config, history).
//!
//! Both images are read the same way: written as an OCI layout (`kiln save
//! --format oci`, `buildah push oci:`) and their layers applied in memory.
//!
//! Run: `cargo test -p kiln-engine --test equivalence -- --nocapture`.

mod common;
#[path = "common/equiv.rs"]
mod equiv;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestRegistry;
use equiv::{Case, Entry, Tree, config_fields, load_cases, mount_targets, read_layout, serve_files};
use serde_json::Value;

/// Cases that fail because of a known kiln bug: (case, reason). They still
/// run and their diff is printed, but they don't fail the test.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

/// Labels buildah adds on its own (BuildKit adds none).
const BUILDAH_ONLY_LABELS: &[&str] = &["io.buildah.version"];

/// What one builder produced for one case.
struct Built {
    tree: Tree,
    config: BTreeMap<String, Value>,
    /// Raw bytes of every output (kiln only, for the secret scan).
    scan: Vec<Vec<u8>>,
}

/// Runs one command with a time limit; `Err` with its output on failure.
fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !out.status.success() {
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b).into_owned();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        return Err(format!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

fn timeout(secs: u32) -> Command {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string());
    c
}

/// sha256 over every path and file of `dir`, to notice writes into the context.
fn context_digest(dir: &Path) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for rel in common::tree(dir) {
        hasher.update(rel.as_bytes());
        if let Ok(bytes) = std::fs::read(dir.join(&rel)) {
            hasher.update(&bytes);
        }
    }
    hex::encode(hasher.finalize())
}

struct Kiln {
    root: PathBuf,
    registry: String,
    work: PathBuf,
}

impl Kiln {
    fn cmd(&self) -> Command {
        let mut c = timeout(240);
        c.arg(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(&self.root)
            .arg("--registry-mirror")
            .arg(format!("docker.io=http://{}", self.registry));
        c
    }

    fn build(&self, case: &Case) -> Result<Built, String> {
        let mut c = self.cmd();
        c.args(["build", "--progress", "plain", "-t", &case.image_name()]);
        c.args(case.shared_build_flags());
        c.arg(&case.dir);
        let context_before = context_digest(&case.dir);
        run(&mut c, "kiln build")?;
        if context_digest(&case.dir) != context_before {
            return Err("kiln build changed files in the build context (a rw bind mount wrote through?)".into());
        }
        let layout = self.work.join(format!("kiln-{}", case.name));
        let mut c = self.cmd();
        c.args(["save", "--format", "oci", "-o"]).arg(&layout).arg(case.image_name());
        run(&mut c, "kiln save")?;
        let image = read_layout(&layout);
        let _ = std::fs::remove_dir_all(&layout); // read into memory; keep the disk free
        let mut c = self.cmd();
        c.args(["inspect", &case.image_name()]);
        let inspect = run(&mut c, "kiln inspect")?;
        let mut scan = image.all_bytes;
        scan.push(inspect);
        let config = config_fields(&image.config["config"]);
        Ok(Built { tree: image.tree, config, scan })
    }
}

/// Buildah keeps its overlay storage mounted; unmount it all before the
/// temporary directory goes.
impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| Path::new(p).starts_with(&self.root) || Path::new(p).starts_with(&self.runroot))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).output();
        }
    }
}

struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
    registries_conf: PathBuf,
    work: PathBuf,
}

impl Buildah {
    fn cmd(&self) -> Command {
        let mut c = timeout(240);
        c.arg("buildah")
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--storage-driver")
            .arg("overlay")
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf);
        c
    }

    fn build(&self, case: &Case) -> Result<Built, String> {
        let mut c = self.cmd();
        // docker format: OCI configs have no Healthcheck, OnBuild or Shell.
        c.args(["build", "--runtime", "runc", "--layers", "--format", "docker", "--quiet", "-t", &case.image_name()]);
        c.arg("-f").arg(case.buildah_dockerfile());
        c.args(&case.buildah_flags);
        c.args(case.shared_build_flags());
        c.arg(&case.dir);
        run(&mut c, "buildah build")?;
        let layout = self.work.join(format!("buildah-{}", case.name));
        let mut c = self.cmd();
        c.args(["push", "--quiet", "--disable-compression", &case.image_name()]).arg(format!("oci:{}:latest", layout.display()));
        run(&mut c, "buildah push")?;
        let image = read_layout(&layout);
        let _ = std::fs::remove_dir_all(&layout); // read into memory; keep the disk free
        let mut c = self.cmd();
        c.args(["inspect", "--type", "image", &case.image_name()]);
        let inspect: Value = serde_json::from_slice(&run(&mut c, "buildah inspect")?).map_err(|e| e.to_string())?;
        let mut config = config_fields(&inspect["Docker"]["config"]);
        if let Some(Value::Object(labels)) = config.get_mut("Labels") {
            for l in BUILDAH_ONLY_LABELS {
                labels.remove(*l);
            }
            if labels.is_empty() {
                config.remove("Labels");
            }
        }
        Ok(Built { tree: image.tree, config, scan: vec![] })
    }
}

/// A rule for a filesystem difference where BuildKit and buildah disagree
/// and kiln follows BuildKit.
struct Ignore {
    name: &'static str,
    why: &'static str,
    /// `(case, path, kiln's entry, buildah's entry)` → ignore?
    applies: fn(&Case, &str, Option<&Entry>, Option<&Entry>) -> bool,
}

const EMPTY_SHA: &str = "sha256:e3b0c44298fc";

/// Files and directories the container runtime needs that buildah 1.28
/// leaves behind after a RUN (empty).
const RUNTIME_STUBS: &[&str] = &["etc/hostname", "etc/hosts", "etc/resolv.conf", "run"];

const IGNORES: &[Ignore] = &[
Ignore {
    name: "runtime-stubs",
    why: "buildah leaves the empty /etc/hostname, /etc/hosts, /etc/resolv.conf and /run it creates for \
          every RUN container in the layer; BuildKit removes stubs it created for mounts",
    applies: |_, path, kiln, buildah| {
        let (None, Some(b)) = (kiln, buildah) else { return false };
        let empty = b.kind == "dir" || b.content.as_deref().is_some_and(|c| c.starts_with(EMPTY_SHA));
        empty && RUNTIME_STUBS.contains(&path)
    },
},
Ignore {
    name: "workdir-created",
    why: "BuildKit creates every WORKDIR directory (owned by the current USER) even when no RUN \
          follows; buildah 1.28 creates it only for a RUN",
    applies: |case, path, kiln, buildah| {
        let (Some(k), None) = (kiln, buildah) else { return false };
        k.kind == "dir"
            && instruction_args(case, "WORKDIR")
                .iter()
                .any(|w| { let w = w.trim_matches('/'); w == path || w.starts_with(&format!("{path}/")) })
    },
},
Ignore {
    name: "chmod-created-dest",
    why: "BuildKit (fsutil since moby/buildkit#4945) applies COPY --chmod to the destination \
          directory it creates for a directory source; buildah 1.28 leaves it 0755",
    applies: |case, path, kiln, buildah| {
        let (Some(k), Some(b)) = (kiln, buildah) else { return false };
        let same_but_mode = Entry { mode: b.mode, ..k.clone() } == *b;
        same_but_mode
            && b.mode == 0o755
            && instruction_args(case, "COPY").iter().any(|args| {
                let words: Vec<&str> = args.split_whitespace().collect();
                let chmod = words.iter().find_map(|w| w.strip_prefix("--chmod="));
                let dest = words.last().map(|d| d.trim_matches('/'));
                chmod.and_then(|m| u32::from_str_radix(m, 8).ok()) == Some(k.mode) && dest == Some(path)
            })
    },
},
Ignore {
    name: "mount-stubs",
    why: "buildah leaves the empty directories/files it created as RUN --mount targets \
          (and their parents) in the layer; BuildKit removes mount points it had to create",
    applies: |case, path, kiln, buildah| {
        let (None, Some(b)) = (kiln, buildah) else { return false };
        let empty = b.kind == "dir" || b.content.as_deref().is_some_and(|c| c.starts_with(EMPTY_SHA));
        let dockerfile = std::fs::read_to_string(case.buildah_dockerfile()).unwrap_or_default();
        empty
            && mount_targets(&dockerfile)
                .iter()
                .any(|t| t == path || t.starts_with(&format!("{path}/")))
    },
},
];

/// The arguments of every `INSTR` line of the case's Dockerfile.
fn instruction_args(case: &Case, instr: &str) -> Vec<String> {
    let text = std::fs::read_to_string(case.dir.join("Dockerfile")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (word, rest) = l.split_once(char::is_whitespace)?;
            word.eq_ignore_ascii_case(instr).then(|| rest.trim().to_string())
        })
        .collect()
}

/// A rule for a config difference where BuildKit and buildah disagree.
struct ConfigIgnore {
    name: &'static str,
    why: &'static str,
    /// `(case, field, kiln's value, buildah's value)` → ignore?
    applies: fn(&Case, &str, &Value, &Value) -> bool,
}

const CONFIG_IGNORES: &[ConfigIgnore] = &[
    ConfigIgnore {
        name: "shell-form-uses-SHELL",
        why: "BuildKit runs shell-form CMD/ENTRYPOINT with the SHELL in effect; buildah 1.28 always \
              uses /bin/sh -c",
        applies: |case, field, kiln, buildah| {
            let Some(shell) = instruction_args(case, "SHELL").last().and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
            else {
                return false;
            };
            let (Some(k), Some(b)) = (kiln.as_array(), buildah.as_array()) else { return false };
            (field == "Cmd" || field == "Entrypoint")
                && b.len() == 3
                && b[0] == "/bin/sh"
                && b[1] == "-c"
                && k.len() == shell.len() + 1
                && k[..shell.len()].iter().zip(&shell).all(|(a, s)| a == s)
                && k[shell.len()] == b[2]
        },
    },
    ConfigIgnore {
        name: "env-replace-in-place",
        why: "BuildKit replaces a re-set variable (e.g. ENV PATH=$PATH:...) where it is in Env; \
              buildah 1.28 moves it to the end: same entries, other order",
        applies: |_, field, kiln, buildah| {
            let sorted = |v: &Value| {
                let mut e: Vec<String> = v.as_array().into_iter().flatten().map(|x| x.to_string()).collect();
                e.sort();
                e
            };
            field == "Env" && sorted(kiln) == sorted(buildah)
        },
    },
];

/// Differences between the two trees that no [`IGNORES`] rule covers,
/// as readable lines; `ignored` counts the ones a rule covered.
fn diff_trees(case: &Case, kiln: &Tree, buildah: &Tree, ignored: &mut BTreeMap<&'static str, usize>) -> Vec<String> {
    let paths: BTreeSet<&String> = kiln.keys().chain(buildah.keys()).collect();
    let mut out = Vec::new();
    for path in paths {
        let (k, b) = (kiln.get(path), buildah.get(path));
        if k == b {
            continue;
        }
        if let Some(rule) = IGNORES.iter().find(|r| (r.applies)(case, path, k, b)) {
            *ignored.entry(rule.name).or_default() += 1;
            continue;
        }
        let show = |e: Option<&Entry>| e.map(|e| e.to_string()).unwrap_or_else(|| "(missing)".into());
        out.push(format!("  /{path}\n      kiln:    {}\n      buildah: {}", show(k), show(b)));
    }
    out
}

fn diff_configs(
    case: &Case,
    kiln: &BTreeMap<String, Value>,
    buildah: &BTreeMap<String, Value>,
    ignored: &mut BTreeMap<&'static str, usize>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = kiln.keys().chain(buildah.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let (k, b) = (kiln.get(key), buildah.get(key));
        if k != b {
            if let (Some(kv), Some(bv)) = (k, b) {
                if let Some(rule) = CONFIG_IGNORES.iter().find(|r| (r.applies)(case, key, kv, bv)) {
                    *ignored.entry(rule.name).or_default() += 1;
                    continue;
                }
            }
            let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
            out.push(format!("  config.{key}\n      kiln:    {}\n      buildah: {}", show(k), show(b)));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Build every case with one builder, in order (cases with `after` need
/// the earlier case's image in the same store).
fn build_all(cases: &[Case], build: impl Fn(&Case) -> Result<Built, String>) -> HashMap<String, Result<Built, String>> {
    let mut results = HashMap::new();
    for case in cases {
        let started = std::time::Instant::now();
        let r = build(case);
        eprintln!("  built {} in {:.1}s{}", case.name, started.elapsed().as_secs_f64(), if r.is_err() { " (failed)" } else { "" });
        results.insert(case.name.clone(), r);
    }
    results
}

#[test]
fn kiln_matches_buildah() {
    for tool in ["buildah", "runc", "docker-registry", "skopeo", "timeout"] {
        if !common::have(tool, "kiln_matches_buildah") {
            return;
        }
    }
    let cases_root = common::repo_root().join("testdata/equiv");
    let registry = TestRegistry::with_busybox();
    let server = serve_files(cases_root.join("21-add-url/served"));
    let mut cases = load_cases(&cases_root, &server);
    assert!(cases.len() >= 25, "expected at least 25 cases in {}, found {}", cases_root.display(), cases.len());
    // KILN_EQUIV_CASES=a,b runs only cases whose names contain one of those
    // words (plus the cases they need), for working on one case.
    if let Ok(only) = std::env::var("KILN_EQUIV_CASES") {
        let words: Vec<&str> = only.split(',').filter(|w| !w.is_empty()).collect();
        let wanted: Vec<String> = cases
            .iter()
            .filter(|c| words.iter().any(|w| c.name.contains(w)))
            .flat_map(|c| c.after.iter().cloned().chain([c.name.clone()]))
            .collect();
        cases.retain(|c| wanted.contains(&c.name));
        println!("KILN_EQUIV_CASES: running {} case(s) only", cases.len());
    }

    let work = tempfile::tempdir().unwrap();
    let registries_conf = work.path().join("registries.conf");
    std::fs::write(
        &registries_conf,
        format!(
            "unqualified-search-registries = [\"docker.io\"]\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            registry.addr
        ),
    )
    .unwrap();
    let kiln = Kiln { root: work.path().join("kiln-root"), registry: registry.addr.clone(), work: work.path().to_path_buf() };
    let buildah = Buildah {
        root: work.path().join("buildah-root"),
        runroot: work.path().join("buildah-run"),
        registries_conf,
        work: work.path().to_path_buf(),
    };

    // The two builders run side by side, each through its cases in order.
    let started = std::time::Instant::now();
    let (kiln_results, buildah_results) = std::thread::scope(|s| {
        let b = s.spawn(|| build_all(&cases, |c| buildah.build(c)));
        let k = build_all(&cases, |c| kiln.build(c));
        (k, b.join().unwrap())
    });
    eprintln!("built {} cases with both builders in {:.1}s", cases.len(), started.elapsed().as_secs_f64());

    let mut matched = 0;
    let mut failures = Vec::new();
    let mut known = Vec::new();
    let mut ignored: BTreeMap<&'static str, usize> = BTreeMap::new();
    for case in &cases {
        let mut problems = Vec::new();
        match (&kiln_results[&case.name], &buildah_results[&case.name]) {
            (Ok(k), Ok(b)) => {
                problems.extend(diff_trees(case, &k.tree, &b.tree, &mut ignored));
                problems.extend(diff_configs(case, &k.config, &b.config, &mut ignored));
                for secret in &case.secret_values {
                    for (i, bytes) in k.scan.iter().enumerate() {
                        if contains(bytes, secret) {
                            problems.push(format!("  secret value found in kiln output #{i} (blob, layer or inspect JSON)"));
                        }
                    }
                }
            }
            (k, b) => {
                if let Err(e) = k {
                    problems.push(format!("  kiln: {e}"));
                }
                if let Err(e) = b {
                    problems.push(format!("  buildah (test setup problem, not kiln's): {e}"));
                }
            }
        }
        let known_reason = KNOWN_FAILURES.iter().find(|(n, _)| *n == case.name).map(|(_, r)| *r);
        if problems.is_empty() {
            matched += 1;
            println!("case {}: match{}", case.name, if known_reason.is_some() { " (listed in KNOWN_FAILURES: remove it)" } else { "" });
        } else if let Some(reason) = known_reason {
            println!("case {}: KNOWN FAILURE ({reason})\n{}", case.name, problems.join("\n"));
            known.push(case.name.clone());
        } else {
            println!("case {}: DIFFERS\n{}", case.name, problems.join("\n"));
            failures.push(case.name.clone());
        }
    }
    for rule in CONFIG_IGNORES {
        println!("ignored {} difference(s) by rule {:?}: {}", ignored.get(rule.name).unwrap_or(&0), rule.name, rule.why);
    }
    for rule in IGNORES {
        println!("ignored {} difference(s) by rule {:?}: {}", ignored.get(rule.name).unwrap_or(&0), rule.name, rule.why);
    }
    println!("equivalence: {matched}/{} cases match", cases.len());
    if !known.is_empty() {
        println!("known failures (not counted against the test): {}", known.join(", "));
    }
    assert!(failures.is_empty(), "cases differing from buildah: {}", failures.join(", "));
}

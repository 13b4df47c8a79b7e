//! Secrets never persist: a build uses `--secret id=x,src=FILE` (as a file
//! mount) and `--secret id=y,env=VAR` (as a file and as an env variable),
//! exports as an OCI tar and a local directory, and then every file under
//! the store root, every output and the JSON progress log are searched for
//! the secret values.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BuildDirs;

/// Every regular file under `dir` (not following symlinks).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Files among `paths` holding any of `secrets` (also inside gzip/zstd
/// compressed blobs and tar members, which are decompressed first).
fn leaks(paths: &[PathBuf], secrets: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for path in paths {
        let Ok(bytes) = std::fs::read(path) else { continue };
        let mut views = vec![bytes.clone()];
        let mut plain = Vec::new();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let _ = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut plain);
        } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            plain = zstd::decode_all(&bytes[..]).unwrap_or_default();
        }
        views.push(plain);
        for view in &views {
            for secret in secrets {
                if contains(view, secret.as_bytes()) {
                    found.push(format!("{} holds {secret:?}", path.display()));
                }
            }
        }
    }
    found
}

#[test]
fn secret_values_are_nowhere_in_the_store_outputs_or_log() {
    if !common::can_run_containers("secrets test", &["docker-registry", "skopeo"]) {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp, root, ctx } = BuildDirs::new();
    let file_secret = "kiln-file-secret-5b1d9c0e77";
    let env_secret = "kiln-env-secret-a83f02c4d1";
    let secret_file = tmp.path().join("token.txt");
    std::fs::write(&secret_file, file_secret).unwrap();
    // The RUNs prove the secrets were there (their length and sha256 land
    // in the image) without writing the values anywhere themselves.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\n\
         RUN --mount=type=secret,id=x sha256sum /run/secrets/x | cut -d' ' -f1 > /x.sha && wc -c < /run/secrets/x\n\
         RUN --mount=type=secret,id=y,env=TOKEN sh -c 'printf %s \"$TOKEN\" | sha256sum | cut -d\" \" -f1 > /y.sha'\n\
         RUN --mount=type=secret,id=y sh -c 'test -s /run/secrets/y && echo y-file-present'\n",
    )
    .unwrap();
    let out_tar = tmp.path().join("out-oci.tar");
    let out_dir = tmp.path().join("out-local");
    let log = tmp.path().join("progress.json");
    let secret_x = format!("id=x,src={}", secret_file.display());
    let mut logs = Vec::new();
    for output in [format!("type=oci,dest={}", out_tar.display()), format!("type=local,dest={}", out_dir.display())] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_TEST_SECRET_VAR", env_secret)
            .arg("--root")
            .arg(&root)
            .args(["--registry-mirror", &mirror, "build", "--progress", "json", "--no-cache"])
            .args(["--secret", &secret_x, "--secret", "id=y,env=KILN_TEST_SECRET_VAR", "-t", "secrets:1"])
            .args(["-o", &output])
            .arg(&ctx)
            .output()
            .unwrap();
        logs.extend_from_slice(&out.stdout);
        logs.extend_from_slice(&out.stderr);
        assert!(out.status.success(), "build -o {output} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(&log, &logs).unwrap();

    // The secrets really reached the RUNs.
    let sha = |s: &str| common::sha256(s.as_bytes()).trim_start_matches("sha256:").to_string();
    assert_eq!(std::fs::read_to_string(out_dir.join("x.sha")).unwrap().trim(), sha(file_secret));
    assert_eq!(std::fs::read_to_string(out_dir.join("y.sha")).unwrap().trim(), sha(env_secret));
    let log_text = String::from_utf8_lossy(&logs);
    assert!(log_text.contains("y-file-present"), "RUN output missing from the json log:\n{log_text}");

    let mut scanned = files(&root);
    let store_files = scanned.len();
    scanned.extend(files(&out_dir));
    scanned.push(out_tar.clone());
    scanned.push(log.clone());
    // Members of the OCI tar: its blobs are compressed layers.
    let unpacked = tmp.path().join("oci-unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    tar::Archive::new(std::fs::File::open(&out_tar).unwrap()).unpack(&unpacked).unwrap();
    scanned.extend(files(&unpacked));
    let found = leaks(&scanned, &[file_secret, env_secret]);
    println!("scanned {} files ({store_files} under the store root)", scanned.len());
    assert!(store_files > 10, "the store looks empty: {store_files} files");
    assert!(found.is_empty(), "secret values persisted:\n{}", found.join("\n"));
    // The scanner itself works: the secret file it was given is found.
    assert_eq!(leaks(&[secret_file], &[file_secret]).len(), 1);
}

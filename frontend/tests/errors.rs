//! Every kind of bad input gives one clear error naming the place
//! (`Dockerfile:line:column: message`, then the offending line), as BuildKit
//! words it, and never a panic.

use kiln_frontend::image::{History, ImageConfig};
use kiln_frontend::{FrontendError, ImageMetaResolver, LowerOptions, Platform, lower};

/// Every image exists with an empty config.
struct AnyImage;

impl ImageMetaResolver for AnyImage {
    fn resolve(&self, _r: &str, _p: &Platform) -> Result<(ImageConfig, Vec<History>), String> {
        Ok((ImageConfig::default(), vec![]))
    }
}

fn err(df: &str, target: Option<&str>) -> FrontendError {
    let opts = LowerOptions { target: target.map(String::from), ..LowerOptions::default() };
    lower(df.as_bytes(), &opts, &AnyImage).expect_err("must fail")
}

fn first_line(e: &FrontendError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[test]
fn messages_name_file_line_and_column() {
    let cases: &[(&str, Option<&str>, &str, Option<&str>)] = &[
        ("FROM a\nRNU make\n", None, "Dockerfile:2:1: unknown instruction: RNU (did you mean RUN?)", Some("RNU make")),
        ("FROM a\nRUN --netwrk=none true\n", None, "Dockerfile:2:5: unknown flag: netwrk (did you mean network?)", None),
        ("FROM a\nCOPY --chmod=abc x /y\n", None, "Dockerfile:2:6: invalid chmod parameter: abc", None),
        ("FROM a\nRUN --mount=type=nope,target=/x true\n", None, "Dockerfile:2:5: unsupported mount type \"nope\"", None),
        ("FROM a\nRUN --mount=type=cache,bogus=1,target=/x true\n", None, "Dockerfile:2:5: unexpected key 'bogus' in 'bogus=1'", None),
        ("FROM a\nCMD [\"a\", 1]\n", None, "Dockerfile:2:1: when using JSON array syntax, arrays must be comprised of strings only", None),
        ("FROM a\nRUN <<EOF\necho\n", None, "Dockerfile:2:1: unterminated heredoc EOF", Some("RUN <<EOF")),
        ("FROM a\nENV A=\"x\n", None, "Dockerfile:2:1: failed to process \"\\\"x\": unexpected end of statement while looking for matching double-quote", None),
        ("FROM a\nCOPY --from=7 x /y\n", None, "Dockerfile:2:1: invalid stage index 7: no such stage", None),
        ("FROM a AS x\nCOPY --from=y /a /a\nFROM a AS y\nCOPY --from=x /b /b\n", None, "circular dependency detected on stage", None),
        ("FROM a AS build\n", Some("biuld"), "Dockerfile: target stage \"biuld\" could not be found (did you mean build?)", None),
        ("FROM a AS 1x\n", None, "Dockerfile:1:1: invalid name for build stage: \"1x\", name can't start with a number or contain symbols", None),
        ("FROM a\nWORKDIR\n", None, "Dockerfile:2:1: WORKDIR requires exactly one argument", None),
        ("FROM a\nHEALTHCHECK --interval=xyz CMD true\n", None, "Dockerfile:2:13: time: invalid duration \"xyz\"", None),
        ("", None, "Dockerfile:1:1: file with no instructions", None),
        ("ENV A=b\n", None, "Dockerfile:1:1: no build stage in current context", None),
        ("FROM ${X:?unset}\n", None, "Dockerfile:1:1: failed to process \"${X:?unset}\": X: unset", None),
    ];
    for (df, target, want, line) in cases {
        let e = err(df, *target);
        let got = first_line(&e);
        assert!(got.contains(want), "for {df:?}\n got: {got}\nwant: {want}");
        if let Some(line) = line {
            assert!(e.to_string().lines().nth(1).is_some_and(|l| l.ends_with(line)), "{e}");
        }
    }
}

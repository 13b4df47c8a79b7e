//! `--call outline|targets|check` as buildx offers them: look at a
//! Dockerfile without building it. Each function returns structured data;
//! the `render_*` functions print it the way buildx does (roughly).

use serde::Serialize;

use crate::error::FrontendError;
use crate::instructions::{self, Dockerfile, Instruction, Stage};
use crate::parser::{self, Span};
use crate::shell::{EnvList, Lex};

/// One build argument in an outline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlineArg {
    /// Name.
    pub name: String,
    /// Default (or `--build-arg` override), unexpanded.
    pub value: Option<String>,
    /// From the comment above it (`# NAME description`).
    pub description: String,
    /// Where it is declared.
    pub span: Span,
}

/// A secret or SSH socket a target's RUN steps use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlineMount {
    /// `id=`.
    pub id: String,
    /// `required=true`.
    pub required: bool,
}

/// `--call outline`: what a target takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outline {
    /// The target stage (name or `stage-N`).
    pub name: String,
    /// Its description.
    pub description: String,
    /// Build arguments reachable from the target, in declaration order.
    pub args: Vec<OutlineArg>,
    /// Secrets used.
    pub secrets: Vec<OutlineMount>,
    /// SSH sockets used.
    pub ssh: Vec<OutlineMount>,
}

/// One entry of `--call targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Stage name.
    pub name: String,
    /// From the comment above FROM (`# name description`).
    pub description: String,
    /// The base as written.
    pub base: String,
    /// The last stage (built without `--target`).
    pub default: bool,
    /// Where it starts.
    pub span: Span,
}

/// One lint warning of `--call check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LintWarning {
    /// Rule, e.g. `FromAsCasing`.
    pub rule: String,
    /// Message.
    pub message: String,
    /// Documentation link.
    pub url: String,
    /// Where.
    pub span: Span,
}

fn typed(dockerfile: &[u8]) -> Result<(parser::ParseResult, Dockerfile), FrontendError> {
    let r = parser::parse(dockerfile)?;
    let df = instructions::from_ast(&r)?;
    Ok((r, df))
}

/// `# name rest...` above an item: `rest` when the first word is `name`.
fn description(name: &str, comments: &[String]) -> String {
    let Some(first) = comments.first() else { return String::new() };
    match first.split_once(char::is_whitespace) {
        Some((w, rest)) if w == name => {
            let mut d = vec![rest.trim().to_string()];
            d.extend(comments[1..].iter().cloned());
            d.join(" ")
        }
        _ => String::new(),
    }
}

/// The stage `--target` names (or the last one).
fn target_index(df: &Dockerfile, target: Option<&str>) -> Result<usize, FrontendError> {
    match target {
        None => Ok(df.stages.len().saturating_sub(1)),
        Some(t) => df
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str()))
            .ok_or_else(|| FrontendError::new(format!("target stage {} could not be found", crate::goquote::quote(t)))),
    }
}

/// Stages the target needs, in order.
fn needed(df: &Dockerfile, target: usize) -> Vec<usize> {
    let mut seen = vec![false; df.stages.len()];
    let mut stack = vec![target];
    let find = |n: &str| {
        df.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(n.to_ascii_lowercase().as_str()))
            .or_else(|| n.parse::<usize>().ok().filter(|i| *i < df.stages.len()))
    };
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        let st = &df.stages[i];
        if let Some(j) = find(&st.base).filter(|j| *j < i) {
            stack.push(j);
        }
        for c in &st.commands {
            match &c.instruction {
                Instruction::Copy(cp) => stack.extend(cp.from.as_deref().and_then(find)),
                Instruction::Run(r) => stack.extend(r.mounts.iter().filter_map(|m| find(&m.from))),
                _ => {}
            }
        }
    }
    (0..df.stages.len()).filter(|i| seen[*i]).collect()
}

/// `--call outline` for `target` (default: last stage).
pub fn outline(dockerfile: &[u8], target: Option<&str>) -> Result<Outline, FrontendError> {
    let (_, df) = typed(dockerfile)?;
    if df.stages.is_empty() {
        return Err(FrontendError::new("file with no stages"));
    }
    let t = target_index(&df, target)?;
    let mut args: Vec<OutlineArg> = Vec::new();
    let mut push = |name: &str, value: Option<String>, comments: &[String], span: Span| {
        if !args.iter().any(|a| a.name == name) {
            args.push(OutlineArg { name: name.into(), value, description: description(name, comments), span });
        }
    };
    for (a, c) in &df.meta_args {
        push(&a.name, a.default.clone(), &c.comments, c.span);
    }
    let (mut secrets, mut ssh) = (Vec::new(), Vec::new());
    for i in needed(&df, t) {
        for c in &df.stages[i].commands {
            match &c.instruction {
                Instruction::Arg { args: decls } => {
                    for a in decls {
                        push(&a.name, a.default.clone(), &c.comments, c.span);
                    }
                }
                Instruction::Run(r) => {
                    for m in &r.mounts {
                        let entry = OutlineMount { id: m.id.clone(), required: m.required };
                        let list = if m.kind == "secret" { &mut secrets } else if m.kind == "ssh" { &mut ssh } else { continue };
                        if !list.contains(&entry) {
                            list.push(entry);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let st = &df.stages[t];
    let name = st.name.clone().unwrap_or_else(|| format!("stage-{t}"));
    Ok(Outline { description: description(&name, &st.comments), name, args, secrets, ssh })
}

/// `--call targets`: every named stage.
pub fn targets(dockerfile: &[u8]) -> Result<Vec<Target>, FrontendError> {
    let (_, df) = typed(dockerfile)?;
    let last = df.stages.len().saturating_sub(1);
    Ok(df
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = s.name.clone().unwrap_or_else(|| format!("stage-{i}"));
            Target { description: description(&name, &s.comments), name, base: s.base.clone(), default: i == last, span: s.span }
        })
        .collect())
}

fn warn(out: &mut Vec<LintWarning>, rule: &str, message: String, span: Span) {
    let mut slug = String::new();
    for (i, c) in rule.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            slug.push('-');
        }
        slug.push(c.to_ascii_lowercase());
    }
    let slug = slug.replace("j-s-o-n", "json");
    out.push(LintWarning {
        rule: rule.into(),
        message,
        url: format!("https://docs.docker.com/go/dockerfile/rule/{slug}/"),
        span,
    });
}

const PREDEFINED: &[&str] = &[
    "TARGETPLATFORM", "TARGETOS", "TARGETARCH", "TARGETVARIANT", "BUILDPLATFORM", "BUILDOS", "BUILDARCH",
    "BUILDVARIANT", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy",
    "https_proxy", "ftp_proxy", "no_proxy", "all_proxy", "PATH", "HOME", "HOSTNAME",
];

fn is_upper(s: &str) -> bool {
    s == s.to_ascii_uppercase()
}

/// `--call check`: lint warnings, in source order.
pub fn check(dockerfile: &[u8]) -> Result<Vec<LintWarning>, FrontendError> {
    let (parsed, df) = typed(dockerfile)?;
    let mut out = Vec::new();
    for w in &parsed.warnings {
        warn(&mut out, "NoEmptyContinuation", "Empty continuation line".into(), w.span);
    }
    // Instruction casing: the majority wins.
    let keywords: Vec<(&str, Span)> = parsed.ast.children.iter().map(|n| (n.value.as_str(), n.span)).collect();
    let upper = keywords.iter().filter(|(k, _)| is_upper(k)).count();
    let majority_upper = upper * 2 >= keywords.len();
    for (k, span) in &keywords {
        let is_lower = *k == k.to_ascii_lowercase();
        if (majority_upper && !is_upper(k)) || (!majority_upper && !is_lower) {
            let case = if majority_upper { "uppercase" } else { "lowercase" };
            warn(&mut out, "ConsistentInstructionCasing", format!("Command '{k}' should match the case of the command majority ({case})"), *span);
        }
    }
    let globals: Vec<String> = df.meta_args.iter().map(|(a, _)| a.name.clone()).collect();
    let lex = Lex::new(parsed.escape_token);
    let mut names: Vec<String> = Vec::new();
    for st in &df.stages {
        check_stage(st, &globals, &lex, &mut names, &mut out);
    }
    out.sort_by_key(|w| (w.span.start_line, w.span.start_col));
    Ok(out)
}

fn check_stage(st: &Stage, globals: &[String], lex: &Lex, names: &mut Vec<String>, out: &mut Vec<LintWarning>) {
    if let (Some(name), Some(written)) = (&st.name, &st.name_as_written) {
        if written != name {
            warn(out, "StageNameCasing", format!("Stage name '{written}' should be lowercase"), st.span);
        }
        if name == "scratch" || name == "context" {
            warn(out, "ReservedStageName", format!("'{name}' is reserved and should not be used as a stage name"), st.span);
        }
        if names.contains(name) {
            warn(out, "DuplicateStageName", format!("Duplicate stage name '{name}', stage names should be unique"), st.span);
        }
        names.push(name.clone());
    }
    if let Some(as_kw) = &st.as_keyword
        && is_upper(&st.keyword) != is_upper(as_kw)
    {
        warn(out, "FromAsCasing", format!("'{as_kw}' and '{}' keywords' casing do not match", st.keyword), st.span);
    }
    let global_env = EnvList::from_slice(&globals.iter().map(|g| format!("{g}=")).collect::<Vec<_>>());
    for word in std::iter::once(st.base.as_str()).chain(st.platform.as_deref()) {
        if let Ok(r) = lex.process_word_with_matches(word, &global_env) {
            for v in r.unmatched.iter().filter(|v| !PREDEFINED.contains(&v.as_str())) {
                warn(out, "UndefinedArgInFrom", format!("FROM argument '{v}' is not declared"), st.span);
            }
        }
    }
    let mut declared: Vec<String> = PREDEFINED.iter().map(|s| s.to_string()).collect();
    let inherits_env = !st.base.eq_ignore_ascii_case("scratch");
    let (mut cmds, mut entrypoints, mut healthchecks) = (0, 0, 0);
    for c in &st.commands {
        let mut words: Vec<&str> = Vec::new();
        match &c.instruction {
            Instruction::Maintainer { .. } => warn(
                out,
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label".into(),
                c.span,
            ),
            Instruction::Cmd(cl) | Instruction::Entrypoint(cl) => {
                let kw = c.keyword.to_ascii_uppercase();
                if cl.prepend_shell {
                    warn(
                        out,
                        "JSONArgsRecommended",
                        format!("JSON arguments recommended for {kw} to prevent unintended behavior related to OS signals"),
                        c.span,
                    );
                }
                if kw == "CMD" { cmds += 1 } else { entrypoints += 1 }
                let n = if kw == "CMD" { cmds } else { entrypoints };
                if n > 1 {
                    warn(out, "MultipleInstructionsDisallowed", format!("Multiple {kw} instructions should not be used in the same stage because only the last one will be used"), c.span);
                }
            }
            Instruction::Healthcheck(_) => {
                healthchecks += 1;
                if healthchecks > 1 {
                    warn(out, "MultipleInstructionsDisallowed", "Multiple HEALTHCHECK instructions should not be used in the same stage because only the last one will be used".into(), c.span);
                }
            }
            Instruction::Env { pairs } | Instruction::Label { pairs } => {
                if c.original.split_whitespace().nth(1).is_some_and(|w| !w.contains('=')) {
                    let kw = c.keyword.to_ascii_uppercase();
                    warn(out, "LegacyKeyValueFormat", format!("\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"), c.span);
                }
                words.extend(pairs.iter().map(|(_, v)| v.as_str()));
                if matches!(c.instruction, Instruction::Env { .. }) {
                    declared.extend(pairs.iter().map(|(k, _)| k.clone()));
                }
            }
            Instruction::Arg { args } => declared.extend(args.iter().map(|a| a.name.clone())),
            Instruction::Workdir { path } => {
                if !path.starts_with('/') && !path.starts_with('$') {
                    warn(out, "WorkdirRelativePath", format!("Relative workdir '{path}' can have unexpected results if the base image changes"), c.span);
                }
                words.push(path);
            }
            Instruction::User { user } => words.push(user),
            Instruction::Copy(cp) => {
                words.extend(cp.sources.iter().map(String::as_str));
                words.push(&cp.dest);
            }
            _ => {}
        }
        // Undefined variables: only where the base's env cannot supply them.
        if !inherits_env {
            let env = EnvList::from_slice(&declared.iter().map(|d| format!("{d}=")).collect::<Vec<_>>());
            for w in words {
                if let Ok(r) = lex.process_word_with_matches(w, &env) {
                    for v in &r.unmatched {
                        warn(out, "UndefinedVar", format!("Usage of undefined variable '${v}'"), c.span);
                    }
                }
            }
        }
    }
}

/// buildx-style text for an outline.
pub fn render_outline(o: &Outline) -> String {
    let mut s = format!("TARGET:      {}\n", o.name);
    if !o.description.is_empty() {
        s.push_str(&format!("DESCRIPTION: {}\n", o.description));
    }
    if !o.args.is_empty() {
        s.push_str("\nBUILD ARG\tVALUE\tDESCRIPTION\n");
        for a in &o.args {
            s.push_str(&format!("{}\t{}\t{}\n", a.name, a.value.as_deref().unwrap_or("<nil>"), a.description));
        }
    }
    for (title, list) in [("SECRET", &o.secrets), ("SSH", &o.ssh)] {
        if !list.is_empty() {
            s.push_str(&format!("\n{title}\tREQUIRED\n"));
            for m in list {
                s.push_str(&format!("{}\t{}\n", m.id, m.required));
            }
        }
    }
    s
}

/// buildx-style text for targets.
pub fn render_targets(t: &[Target]) -> String {
    let mut s = String::from("TARGET\tDESCRIPTION\n");
    for t in t {
        let name = if t.default { format!("{} (default)", t.name) } else { t.name.clone() };
        s.push_str(&format!("{name}\t{}\n", t.description));
    }
    s
}

/// buildx-style text for lint warnings (`file` names the Dockerfile).
pub fn render_check(warnings: &[LintWarning], file: &str) -> String {
    let mut s = String::new();
    for w in warnings {
        s.push_str(&format!("WARNING: {} - {}\n{}\n{file}:{}:{}\n\n", w.rule, w.url, w.message, w.span.start_line, w.span.start_col));
    }
    if warnings.is_empty() {
        s.push_str("Check complete, no warnings found.\n");
    } else {
        s.push_str(&format!("Check complete, {} warning{} found!\n", warnings.len(), if warnings.len() == 1 { " has been" } else { "s have been" }));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const DF: &[u8] = b"# VERSION the release to build\nARG VERSION=1.0\n# build compiles the app\nFROM busybox AS build\n# GOOS target OS\nARG GOOS=linux\nRUN --mount=type=secret,id=tok,required=true make\nFROM scratch as Release\nMAINTAINER me\nCOPY --from=build /out /out\nWORKDIR app\nCMD run it\nrun x\n";

    #[test]
    fn outline_and_targets() {
        let o = outline(DF, Some("build")).unwrap();
        assert_eq!(o.description, "compiles the app");
        let args: Vec<(&str, Option<&str>, &str)> =
            o.args.iter().map(|a| (a.name.as_str(), a.value.as_deref(), a.description.as_str())).collect();
        assert_eq!(args, [("VERSION", Some("1.0"), "the release to build"), ("GOOS", Some("linux"), "target OS")]);
        assert_eq!(o.secrets, [OutlineMount { id: "tok".into(), required: true }]);
        let t = targets(DF).unwrap();
        assert_eq!(t.iter().map(|t| (t.name.as_str(), t.default)).collect::<Vec<_>>(), [("build", false), ("release", true)]);
        assert!(render_targets(&t).contains("release (default)"));
    }

    #[test]
    fn check_finds_the_usual_problems() {
        let w = check(DF).unwrap();
        let rules: Vec<&str> = w.iter().map(|w| w.rule.as_str()).collect();
        for r in ["StageNameCasing", "FromAsCasing", "MaintainerDeprecated", "WorkdirRelativePath", "JSONArgsRecommended", "ConsistentInstructionCasing"] {
            assert!(rules.contains(&r), "{r} missing from {rules:?}");
        }
        let w = check(b"FROM scratch\nENV A=$B\n").unwrap();
        assert_eq!(w[0].message, "Usage of undefined variable '$B'");
        assert_eq!(w[0].url, "https://docs.docker.com/go/dockerfile/rule/undefined-var/");
        assert!(check(b"FROM busybox\nCMD [\"x\"]\n").unwrap().is_empty());
        assert!(render_check(&[], "Dockerfile").contains("no warnings"));
    }
}

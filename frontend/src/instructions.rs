//! Typed instructions: the AST of [`crate::parser`] becomes [`Stage`]s of
//! [`Command`]s with parsed and validated flags (BuildKit's
//! `frontend/dockerfile/instructions`). Nothing is expanded here: values
//! keep their `$VAR`s, which lowering expands once ARG/ENV scope is known.

use serde::Serialize;

use crate::error::{FrontendError, suggest};
use crate::parser::{Heredoc, Node, ParseResult, Span};

/// Instruction keywords, upper case.
pub const INSTRUCTIONS: &[&str] = &[
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
];

/// A command line in shell or exec (JSON) form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CommandLine {
    /// Exec form: argv. Shell form: one element, the command text.
    pub args: Vec<String>,
    /// True for shell form (to be wrapped in SHELL).
    pub prepend_shell: bool,
}

/// `--mount=type=...` of RUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunMount {
    /// `bind`, `cache`, `tmpfs`, `secret` or `ssh`.
    pub kind: String,
    /// `target=` (`dst=`, `destination=`).
    pub target: String,
    /// `source=` (`src=`).
    pub source: String,
    /// `from=`: stage name/index or image.
    pub from: String,
    /// `ro` / `readonly` (or `rw=false`).
    pub readonly: bool,
    /// `id=`.
    pub id: String,
    /// `sharing=`: `shared`, `private`, `locked`.
    pub sharing: String,
    /// `mode=` (octal).
    pub mode: Option<u32>,
    /// `uid=`.
    pub uid: Option<u32>,
    /// `gid=`.
    pub gid: Option<u32>,
    /// `required=`.
    pub required: bool,
    /// `env=` (secrets).
    pub env: String,
    /// `size=` (tmpfs), bytes.
    pub size: u64,
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunCommand {
    /// The command.
    pub cmd: CommandLine,
    /// Heredoc files (scripts).
    pub heredocs: Vec<Heredoc>,
    /// `--mount`s.
    pub mounts: Vec<RunMount>,
    /// `--network=default|none|host`.
    pub network: Option<String>,
    /// `--security=sandbox|insecure`.
    pub security: Option<String>,
}

/// COPY or ADD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyCommand {
    /// ADD rather than COPY.
    pub add: bool,
    /// Source paths (heredoc sources are in `heredocs`).
    pub sources: Vec<String>,
    /// Heredoc sources: file name is the heredoc name.
    pub heredocs: Vec<Heredoc>,
    /// Destination.
    pub dest: String,
    /// `--from`.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` (repeatable).
    pub exclude: Vec<String>,
    /// ADD `--checksum`.
    pub checksum: Option<String>,
    /// ADD `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// ADD `--unpack`.
    pub unpack: Option<bool>,
}

/// HEALTHCHECK.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HealthcheckCommand {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", cmd]`.
    pub test: Vec<String>,
    /// `--interval` (ns).
    pub interval: i64,
    /// `--timeout` (ns).
    pub timeout: i64,
    /// `--start-period` (ns).
    pub start_period: i64,
    /// `--start-interval` (ns).
    pub start_interval: i64,
    /// `--retries`.
    pub retries: i64,
}

/// One ARG declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgDecl {
    /// Name.
    pub name: String,
    /// Default value (unexpanded), if given.
    pub default: Option<String>,
}

/// The typed instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Instruction {
    /// RUN.
    Run(RunCommand),
    /// COPY / ADD.
    Copy(CopyCommand),
    /// ENV pairs.
    Env {
        /// `(name, value)`.
        pairs: Vec<(String, String)>,
    },
    /// ARG declarations.
    Arg {
        /// The declarations.
        args: Vec<ArgDecl>,
    },
    /// LABEL pairs.
    Label {
        /// `(key, value)`.
        pairs: Vec<(String, String)>,
    },
    /// EXPOSE ports.
    Expose {
        /// e.g. `80/tcp`, `8080`.
        ports: Vec<String>,
    },
    /// VOLUME paths.
    Volume {
        /// Paths.
        paths: Vec<String>,
    },
    /// WORKDIR.
    Workdir {
        /// Path.
        path: String,
    },
    /// USER.
    User {
        /// `user[:group]`.
        user: String,
    },
    /// STOPSIGNAL.
    StopSignal {
        /// Signal.
        signal: String,
    },
    /// MAINTAINER (deprecated).
    Maintainer {
        /// Name.
        name: String,
    },
    /// CMD.
    Cmd(CommandLine),
    /// ENTRYPOINT.
    Entrypoint(CommandLine),
    /// SHELL.
    Shell {
        /// The shell argv.
        shell: Vec<String>,
    },
    /// HEALTHCHECK.
    Healthcheck(HealthcheckCommand),
    /// ONBUILD: the trigger's source text, kept for the image config.
    Onbuild {
        /// e.g. `RUN make`.
        expression: String,
    },
}

/// An instruction with its place in the Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Command {
    /// The keyword as written (e.g. `run`).
    pub keyword: String,
    /// The logical source line.
    pub original: String,
    /// Where it is.
    pub span: Span,
    /// Comments right above it.
    pub comments: Vec<String>,
    /// What it does.
    pub instruction: Instruction,
}

/// A build stage: `FROM base [AS name]` and its commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// The name as written in `AS` (for lint checks).
    pub name_as_written: Option<String>,
    /// The base (unexpanded).
    pub base: String,
    /// `--platform` (unexpanded).
    pub platform: Option<String>,
    /// The FROM line's span.
    pub span: Span,
    /// The FROM line.
    pub original: String,
    /// Comments above the FROM line.
    pub comments: Vec<String>,
    /// The FROM keyword as written.
    pub keyword: String,
    /// The `AS` keyword as written.
    pub as_keyword: Option<String>,
    /// Instructions after FROM.
    pub commands: Vec<Command>,
}

/// The typed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// ARGs before the first FROM.
    pub meta_args: Vec<(ArgDecl, Command)>,
    /// The stages in order.
    pub stages: Vec<Stage>,
}

/// Type a parsed Dockerfile (BuildKit's `instructions.Parse`).
pub fn from_ast(result: &ParseResult) -> Result<Dockerfile, FrontendError> {
    let mut df = Dockerfile { meta_args: Vec::new(), stages: Vec::new() };
    for node in &result.ast.children {
        let kw = node.value.to_ascii_uppercase();
        if kw == "FROM" {
            df.stages.push(parse_from(node)?);
            continue;
        }
        let cmd = parse_command(node)?;
        match df.stages.last_mut() {
            Some(stage) => stage.commands.push(cmd),
            None => match &cmd.instruction {
                Instruction::Arg { args } => {
                    for a in args.clone() {
                        df.meta_args.push((a, cmd.clone()));
                    }
                }
                _ => return Err(FrontendError::at("no build stage in current context", node.span)),
            },
        }
    }
    Ok(df)
}

/// Parsed `--flags` of one instruction (BuildKit's `BFlags`).
struct Flags<'a> {
    node: &'a Node,
    values: Vec<(String, Option<String>)>,
}

impl<'a> Flags<'a> {
    /// Check the flags against `allowed` (`name` plus `true` for flags that
    /// take a value) and split them.
    fn parse(node: &'a Node, allowed: &[(&str, FlagKind)]) -> Result<Self, FrontendError> {
        let mut values: Vec<(String, Option<String>)> = Vec::new();
        for f in &node.flags {
            let err = |m: String| FrontendError::at(m, flag_span(node, f));
            let Some(body) = f.strip_prefix("--") else {
                return Err(err(format!("arg {} must start with --", crate::goquote::quote(f))));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let Some((_, kind)) = allowed.iter().find(|(n, _)| *n == name) else {
                let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
                let hint = suggest(name, names).map(|s| format!(" (did you mean {s}?)")).unwrap_or_default();
                return Err(err(format!("unknown flag: {name}{hint}")));
            };
            if *kind != FlagKind::Strings && values.iter().any(|(n, _)| n == name) {
                return Err(err(format!("duplicate flag specified: {name}")));
            }
            match kind {
                FlagKind::Bool => {
                    if let Some(v) = &value
                        && !matches!(v.to_ascii_lowercase().as_str(), "true" | "false")
                    {
                        return Err(err(format!("expecting boolean value for flag {name}, not: {v}")));
                    }
                }
                FlagKind::String | FlagKind::Strings => {
                    if value.is_none() {
                        return Err(err(format!("missing a value on flag: {name}")));
                    }
                }
            }
            values.push((name.to_string(), value));
        }
        Ok(Flags { node, values })
    }

    fn string(&self, name: &str) -> Option<String> {
        self.values.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.clone())
    }

    fn strings(&self, name: &str) -> Vec<String> {
        self.values.iter().filter(|(n, _)| n == name).filter_map(|(_, v)| v.clone()).collect()
    }

    fn bool(&self, name: &str) -> bool {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, v)| v.as_deref().is_none_or(|v| v.eq_ignore_ascii_case("true")))
    }

    fn opt_bool(&self, name: &str) -> Option<bool> {
        self.values.iter().any(|(n, _)| n == name).then(|| self.bool(name))
    }

    fn err_at_flag(&self, name: &str, m: String) -> FrontendError {
        let f = self.node.flags.iter().find(|f| f.starts_with(&format!("--{name}"))).cloned().unwrap_or_default();
        FrontendError::at(m, flag_span(self.node, &f))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    String,
    Strings,
}

/// The span of one flag: its column on the instruction's first line.
fn flag_span(node: &Node, flag: &str) -> Span {
    let mut s = node.span;
    if let Some(i) = node.original.find(flag) {
        s.start_col = node.span.start_col + node.original[..i].chars().count();
    }
    s
}

fn values(node: &Node) -> Vec<String> {
    node.next.iter().map(|n| n.value.clone()).collect()
}

fn parse_from(node: &Node) -> Result<Stage, FrontendError> {
    let flags = Flags::parse(node, &[("platform", FlagKind::String)])?;
    let args = values(node);
    let bad = || FrontendError::at("FROM requires either one or three arguments", node.span);
    let (name, name_as_written, as_kw) = match args.len() {
        1 => (None, None, None),
        3 if args[1].eq_ignore_ascii_case("as") => {
            let n = args[2].to_ascii_lowercase();
            let valid = n.starts_with(|c: char| c.is_ascii_lowercase())
                && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid {
                return Err(FrontendError::at(
                    format!(
                        "invalid name for build stage: {}, name can't start with a number or contain symbols",
                        crate::goquote::quote(&args[2])
                    ),
                    node.span,
                ));
            }
            (Some(n), Some(args[2].clone()), Some(args[1].clone()))
        }
        _ => return Err(bad()),
    };
    Ok(Stage {
        name,
        name_as_written,
        base: args[0].clone(),
        platform: flags.string("platform"),
        span: node.span,
        original: node.original.clone(),
        comments: node.prev_comment.clone(),
        keyword: node.value.clone(),
        as_keyword: as_kw,
        commands: Vec::new(),
    })
}

fn exactly_one(node: &Node, kw: &str) -> Result<String, FrontendError> {
    let v = values(node);
    if v.len() != 1 {
        return Err(FrontendError::at(format!("{kw} requires exactly one argument"), node.span));
    }
    Ok(v.into_iter().next().unwrap_or_default())
}

fn at_least_one(node: &Node, kw: &str) -> Result<Vec<String>, FrontendError> {
    let v = values(node);
    if v.is_empty() {
        return Err(FrontendError::at(format!("{kw} requires at least one argument"), node.span));
    }
    Ok(v)
}

fn command_line(node: &Node) -> CommandLine {
    CommandLine { args: values(node), prepend_shell: !node.json }
}

fn no_flags(node: &Node) -> Result<(), FrontendError> {
    Flags::parse(node, &[]).map(|_| ())
}

fn pairs(node: &Node) -> Vec<(String, String)> {
    node.next.chunks(3).map(|c| (c[0].value.clone(), c.get(1).map(|n| n.value.clone()).unwrap_or_default())).collect()
}

/// Parse one non-FROM instruction node.
pub fn parse_command(node: &Node) -> Result<Command, FrontendError> {
    let kw = node.value.to_ascii_uppercase();
    let instruction = match kw.as_str() {
        "RUN" => {
            let flags = Flags::parse(
                node,
                &[("mount", FlagKind::Strings), ("network", FlagKind::String), ("security", FlagKind::String)],
            )?;
            let mut mounts = Vec::new();
            for m in flags.strings("mount") {
                mounts.push(parse_mount(&m).map_err(|e| flags.err_at_flag("mount", e))?);
            }
            let network = flags.string("network");
            if let Some(n) = &network
                && !matches!(n.as_str(), "default" | "none" | "host")
                && !n.contains('$')
            {
                return Err(flags.err_at_flag("network", format!("unsupported network mode {n:?}")));
            }
            let security = flags.string("security");
            if let Some(s) = &security
                && !matches!(s.as_str(), "sandbox" | "insecure")
                && !s.contains('$')
            {
                return Err(flags.err_at_flag("security", format!("unsupported security mode {s:?}")));
            }
            let cmd = command_line(node);
            if cmd.args.is_empty() && !node.json {
                return Err(FrontendError::at("RUN requires at least one argument", node.span));
            }
            Instruction::Run(RunCommand { cmd, heredocs: node.heredocs.clone(), mounts, network, security })
        }
        "COPY" | "ADD" => {
            let add = kw == "ADD";
            let mut allowed = vec![
                ("chown", FlagKind::String),
                ("chmod", FlagKind::String),
                ("link", FlagKind::Bool),
                ("exclude", FlagKind::Strings),
            ];
            if add {
                allowed.extend([
                    ("checksum", FlagKind::String),
                    ("keep-git-dir", FlagKind::Bool),
                    ("unpack", FlagKind::Bool),
                ]);
            } else {
                allowed.extend([("from", FlagKind::String), ("parents", FlagKind::Bool)]);
            }
            let flags = Flags::parse(node, &allowed)?;
            let mut args = values(node);
            if args.len() < 2 {
                return Err(FrontendError::at(
                    format!(
                        "{kw} requires at least two arguments, but only one was provided. Destination could not be determined"
                    ),
                    node.span,
                ));
            }
            let dest = args.pop().unwrap_or_default();
            if crate::parser::parse_heredoc(&dest).ok().flatten().is_some() && !node.json {
                return Err(FrontendError::at(format!("{kw} cannot have a heredoc as a destination"), node.span));
            }
            let mut sources = Vec::new();
            let mut heredocs = Vec::new();
            for s in args {
                match crate::parser::parse_heredoc(&s).ok().flatten().filter(|_| !node.json) {
                    Some(h) => {
                        let found = node.heredocs.iter().find(|d| d.name == h.name).cloned().unwrap_or(h);
                        heredocs.push(found)
                    }
                    None => sources.push(s),
                }
            }
            if let Some(c) = flags.string("chmod")
                && !c.contains('$')
                && u32::from_str_radix(&c, 8).is_err()
            {
                return Err(flags.err_at_flag("chmod", format!("invalid chmod parameter: {c}")));
            }
            Instruction::Copy(CopyCommand {
                add,
                sources,
                heredocs,
                dest,
                from: flags.string("from"),
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                link: flags.bool("link"),
                parents: flags.bool("parents"),
                exclude: flags.strings("exclude"),
                checksum: flags.string("checksum"),
                keep_git_dir: flags.bool("keep-git-dir"),
                unpack: flags.opt_bool("unpack"),
            })
        }
        "ENV" | "LABEL" => {
            no_flags(node)?;
            if node.next.is_empty() {
                return Err(FrontendError::at(format!("{kw} requires at least one argument"), node.span));
            }
            let p = pairs(node);
            if kw == "ENV" {
                if p.iter().any(|(k, _)| k.is_empty()) {
                    return Err(FrontendError::at("ENV names can not be blank", node.span));
                }
                Instruction::Env { pairs: p }
            } else {
                Instruction::Label { pairs: p }
            }
        }
        "ARG" => {
            no_flags(node)?;
            let v = at_least_one(node, "ARG")?;
            let args = v
                .into_iter()
                .map(|w| match w.split_once('=') {
                    Some((k, d)) => ArgDecl { name: k.to_string(), default: Some(d.to_string()) },
                    None => ArgDecl { name: w, default: None },
                })
                .collect::<Vec<_>>();
            if args.iter().any(|a| a.name.is_empty()) {
                return Err(FrontendError::at("ARG names can not be blank", node.span));
            }
            Instruction::Arg { args }
        }
        "EXPOSE" => {
            no_flags(node)?;
            Instruction::Expose { ports: at_least_one(node, "EXPOSE")? }
        }
        "VOLUME" => {
            no_flags(node)?;
            let paths = at_least_one(node, "VOLUME")?;
            if paths.iter().any(|p| p.trim().is_empty()) {
                return Err(FrontendError::at("VOLUME specified can not be an empty string", node.span));
            }
            Instruction::Volume { paths }
        }
        "WORKDIR" => {
            no_flags(node)?;
            Instruction::Workdir { path: exactly_one(node, "WORKDIR")? }
        }
        "USER" => {
            no_flags(node)?;
            Instruction::User { user: exactly_one(node, "USER")? }
        }
        "STOPSIGNAL" => {
            no_flags(node)?;
            Instruction::StopSignal { signal: exactly_one(node, "STOPSIGNAL")? }
        }
        "MAINTAINER" => {
            no_flags(node)?;
            Instruction::Maintainer { name: exactly_one(node, "MAINTAINER")? }
        }
        "CMD" => {
            no_flags(node)?;
            Instruction::Cmd(command_line(node))
        }
        "ENTRYPOINT" => {
            no_flags(node)?;
            Instruction::Entrypoint(command_line(node))
        }
        "SHELL" => {
            no_flags(node)?;
            let shell = at_least_one(node, "SHELL")?;
            if !node.json {
                return Err(FrontendError::at("SHELL requires the arguments to be in JSON form", node.span));
            }
            Instruction::Shell { shell }
        }
        "HEALTHCHECK" => Instruction::Healthcheck(parse_healthcheck(node)?),
        "ONBUILD" => {
            no_flags(node)?;
            let Some(child) = node.next.first().and_then(|n| n.children.first()) else {
                return Err(FrontendError::at("ONBUILD requires at least one argument", node.span));
            };
            let ck = child.value.to_ascii_uppercase();
            if matches!(ck.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(FrontendError::at(format!("{ck} isn't allowed as an ONBUILD trigger"), node.span));
            }
            let mut c = child.clone();
            c.span = node.span;
            parse_command(&c)?;
            // As BuildKit: the trigger text, then each heredoc's body and
            // terminator, so the trigger can be parsed again later.
            let mut expression = child.original.clone();
            for h in &node.heredocs {
                expression.push('\n');
                expression.push_str(&h.content);
                expression.push_str(&h.name);
            }
            Instruction::Onbuild { expression }
        }
        _ => {
            let hint = suggest(&node.value, INSTRUCTIONS.iter().copied())
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            return Err(FrontendError::at(format!("unknown instruction: {}{hint}", node.value), node.span));
        }
    };
    Ok(Command {
        keyword: node.value.clone(),
        original: node.original.clone(),
        span: node.span,
        comments: node.prev_comment.clone(),
        instruction,
    })
}

fn parse_healthcheck(node: &Node) -> Result<HealthcheckCommand, FrontendError> {
    let flags = Flags::parse(
        node,
        &[
            ("interval", FlagKind::String),
            ("timeout", FlagKind::String),
            ("start-period", FlagKind::String),
            ("start-interval", FlagKind::String),
            ("retries", FlagKind::String),
        ],
    )?;
    let args = values(node);
    let Some(typ) = args.first() else {
        return Err(FrontendError::at("HEALTHCHECK requires at least one argument", node.span));
    };
    let typ = typ.to_ascii_uppercase();
    let mut hc = HealthcheckCommand::default();
    match typ.as_str() {
        "NONE" => {
            if args.len() != 1 {
                return Err(FrontendError::at("HEALTHCHECK NONE takes no arguments", node.span));
            }
            if !node.flags.is_empty() {
                return Err(FrontendError::at("HEALTHCHECK NONE does not support options", node.span));
            }
            hc.test = vec!["NONE".into()];
            return Ok(hc);
        }
        "CMD" => {
            let rest = &args[1..];
            if rest.is_empty() {
                return Err(FrontendError::at("Missing command after HEALTHCHECK CMD", node.span));
            }
            if node.json {
                hc.test = std::iter::once("CMD".to_string()).chain(rest.iter().cloned()).collect();
            } else {
                hc.test = vec!["CMD-SHELL".into(), rest[0].clone()];
            }
        }
        _ => {
            return Err(FrontendError::at(
                format!("Unknown type {} in HEALTHCHECK (try CMD)", crate::goquote::quote(&args[0])),
                node.span,
            ));
        }
    }
    for (name, slot) in [
        ("interval", &mut hc.interval),
        ("timeout", &mut hc.timeout),
        ("start-period", &mut hc.start_period),
        ("start-interval", &mut hc.start_interval),
    ] {
        if let Some(v) = flags.string(name) {
            let d = parse_go_duration(&v).map_err(|e| flags.err_at_flag(name, e))?;
            if d != 0 && d < 1_000_000 {
                return Err(flags.err_at_flag(name, format!("Interval {name:?} cannot be less than 1ms")));
            }
            if d < 0 {
                return Err(flags.err_at_flag(name, format!("Interval {name:?} cannot be negative")));
            }
            *slot = d;
        }
    }
    if let Some(v) = flags.string("retries") {
        let r: i64 = v.parse().map_err(|_| flags.err_at_flag("retries", format!("invalid retries value: {v}")))?;
        if r < 0 {
            return Err(flags.err_at_flag("retries", "--retries cannot be negative".into()));
        }
        hc.retries = r;
    }
    Ok(hc)
}

/// Go's `time.ParseDuration` (e.g. `1m30s`, `500ms`), in nanoseconds.
pub fn parse_go_duration(s: &str) -> Result<i64, String> {
    let err = || format!("time: invalid duration {}", crate::goquote::quote(s));
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(err());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        if n == 0 {
            return Err(err());
        }
        let num: f64 = rest[..n].parse().map_err(|_| err())?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("time: missing unit in duration {}", crate::goquote::quote(s))),
            _ => return Err(err()),
        };
        rest = &rest[u..];
        total += num * mult;
    }
    if total > i64::MAX as f64 {
        return Err(err());
    }
    Ok(if neg { -(total as i64) } else { total as i64 })
}

/// Split a CSV field list as Go's `encoding/csv` does for one record
/// (double quotes group, `""` is a quote).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut at_start = true;
    let mut in_quotes = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            ',' => {
                out.push(std::mem::take(&mut cur));
                at_start = true;
                continue;
            }
            '"' if at_start => in_quotes = true,
            '"' => return Err(format!("parse error: bare \" in non-quoted-field: {s}")),
            c => cur.push(c),
        }
        at_start = false;
    }
    if in_quotes {
        return Err(format!("parse error: extraneous or missing \" in quoted-field: {s}"));
    }
    out.push(cur);
    Ok(out)
}

fn parse_bool_value(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}

/// Parse one `--mount` value (unexpanded `$VAR`s are kept in string fields;
/// numeric fields must be literal).
pub fn parse_mount(value: &str) -> Result<RunMount, String> {
    let fields = csv_fields(value)?;
    let mut m = RunMount {
        kind: "bind".into(),
        target: String::new(),
        source: String::new(),
        from: String::new(),
        readonly: false,
        id: String::new(),
        sharing: "shared".into(),
        mode: None,
        uid: None,
        gid: None,
        required: false,
        env: String::new(),
        size: 0,
    };
    // The type decides the defaults, so find it first.
    for f in &fields {
        if let Some(("type", v)) = f.split_once('=').map(|(k, v)| (k.trim(), v)) {
            m.kind = v.to_ascii_lowercase();
        }
    }
    if !matches!(m.kind.as_str(), "bind" | "cache" | "tmpfs" | "secret" | "ssh") {
        return Err(format!("unsupported mount type {}", crate::goquote::quote(&m.kind)));
    }
    let mut readonly_set = None;
    for f in fields {
        let (key, val) = match f.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
            None => (f.trim().to_ascii_lowercase(), None),
        };
        let bool_val = || match &val {
            None => Ok(true),
            Some(v) => parse_bool_value(v).ok_or_else(|| format!("invalid value for {key}: {v}")),
        };
        let need = || val.clone().ok_or_else(|| format!("invalid field '{f}' must be a key=value pair"));
        let num = |radix| {
            let v = need()?;
            u32::from_str_radix(&v, radix).map_err(|_| format!("invalid value for {key}: {v}"))
        };
        match key.as_str() {
            "type" => {}
            "readonly" | "ro" => readonly_set = Some(bool_val()?),
            "readwrite" | "rw" => readonly_set = Some(!bool_val()?),
            "required" if matches!(m.kind.as_str(), "secret" | "ssh") => m.required = bool_val()?,
            "target" | "dst" | "destination" => m.target = need()?,
            "source" | "src" => m.source = need()?,
            "from" => m.from = need()?,
            "id" => m.id = need()?,
            "sharing" if m.kind == "cache" => {
                let v = need()?.to_ascii_lowercase();
                if !matches!(v.as_str(), "shared" | "private" | "locked") {
                    return Err(format!("unsupported sharing value {v:?}"));
                }
                m.sharing = v;
            }
            "mode" if m.kind != "tmpfs" && m.kind != "bind" => m.mode = Some(num(8)?),
            "uid" if m.kind != "tmpfs" && m.kind != "bind" => m.uid = Some(num(10)?),
            "gid" if m.kind != "tmpfs" && m.kind != "bind" => m.gid = Some(num(10)?),
            "env" if m.kind == "secret" => m.env = need()?,
            "size" if m.kind == "tmpfs" => m.size = parse_size(&need()?)?,
            _ => return Err(format!("unexpected key '{key}' in '{f}'")),
        }
    }
    m.readonly = readonly_set.unwrap_or(m.kind == "bind");
    match m.kind.as_str() {
        "secret" => {
            if m.id.is_empty() && m.target.is_empty() && m.env.is_empty() {
                return Err("one of source, target, env or id is required for secret mounts".into());
            }
            if m.id.is_empty() {
                let base = if m.target.is_empty() { &m.env } else { &m.target };
                m.id = base.rsplit('/').next().unwrap_or_default().to_string();
            }
            if m.target.is_empty() && m.env.is_empty() {
                m.target = format!("/run/secrets/{}", m.id);
            }
        }
        "ssh" => {
            if m.id.is_empty() {
                m.id = "default".into();
            }
        }
        _ => {
            if m.target.is_empty() {
                return Err("mount target is required".into());
            }
        }
    }
    Ok(m)
}

/// `size=` of tmpfs: bytes with an optional k/m/g suffix (units of 1024).
fn parse_size(v: &str) -> Result<u64, String> {
    let lower = v.to_ascii_lowercase();
    let t = lower.trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().map(|n| n.saturating_mul(mult)).map_err(|_| format!("invalid size: {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(src: &str) -> Result<Dockerfile, FrontendError> {
        from_ast(&crate::parser::parse(src.as_bytes())?)
    }

    #[test]
    fn types_flags_and_mounts() {
        let df = typed(
            "ARG V=1\nFROM --platform=$BUILDPLATFORM busybox AS Build\n\
             RUN --mount=type=cache,target=/c,sharing=locked,mode=0700 --network=none make\n\
             COPY --from=build --chown=1:2 --chmod=644 --link a b /d/\n",
        )
        .unwrap();
        assert_eq!(df.meta_args[0].0.default.as_deref(), Some("1"));
        let st = &df.stages[0];
        assert_eq!(st.name.as_deref(), Some("build"));
        assert_eq!(st.platform.as_deref(), Some("$BUILDPLATFORM"));
        let Instruction::Run(r) = &st.commands[0].instruction else { panic!() };
        assert_eq!(r.mounts[0].kind, "cache");
        assert_eq!(r.mounts[0].sharing, "locked");
        assert_eq!(r.mounts[0].mode, Some(0o700));
        assert_eq!(r.network.as_deref(), Some("none"));
        let Instruction::Copy(c) = &st.commands[1].instruction else { panic!() };
        assert_eq!((c.sources.clone(), c.dest.as_str(), c.link), (vec!["a".to_string(), "b".into()], "/d/", true));
    }

    #[test]
    fn rejects_bad_input_with_position() {
        let e = typed("FROM a\nRNU make\n").unwrap_err();
        assert_eq!(e.to_string().lines().next().unwrap(), "Dockerfile:2:1: unknown instruction: RNU (did you mean RUN?)");
        let e = typed("FROM a\nRUN --mnt=type=bind,target=/x ls\n").unwrap_err();
        assert_eq!(e.message, "unknown flag: mnt (did you mean mount?)");
        assert_eq!(e.span.unwrap().start_col, 5);
        let e = typed("FROM a\nRUN --mount=type=foo,target=/x ls\n").unwrap_err();
        assert!(e.message.contains("unsupported mount type"), "{e}");
        let e = typed("FROM a\nCOPY --from x\n").unwrap_err();
        assert_eq!(e.message, "missing a value on flag: from");
        assert!(typed("RUN x\n").is_err());
        assert!(typed("FROM a b\n").is_err());
        assert!(typed("FROM a\nHEALTHCHECK --interval=5x CMD true\n").is_err());
        assert!(typed("FROM a\nONBUILD FROM b\n").is_err());
        assert_eq!(parse_go_duration("1m30s").unwrap(), 90_000_000_000);
    }
}

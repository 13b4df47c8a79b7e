//! Dockerfile text → AST with source ranges, with the behaviour of BuildKit's
//! `frontend/dockerfile/parser` (`Parse`, `Node.Dump`).
//!
//! The text is read line by line (a line may be at most 65535 bytes, as
//! BuildKit's scanner allows). Leading parser directives (`# escape=`,
//! `# syntax=`, `# check=`) are recognised until the first line that is not
//! one; comments are dropped, also inside continuations; a line ending in the
//! escape character continues on the next one; empty continuation lines are
//! skipped with a warning. Each logical line becomes one [`Node`]: the
//! instruction keyword, its `--flags`, and its arguments as a chain of
//! [`Node::next`] values shaped per instruction (JSON or shell form,
//! name/value triples for ENV/LABEL, ...). Heredocs (`<<EOF`) of RUN, COPY
//! and ADD are read from the following lines into [`Node::heredocs`].

use serde::{Deserialize, Serialize};

use crate::error::FrontendError;
use crate::goquote::quote;
use crate::shell::{EmptyEnv, Lex};

/// A range in the Dockerfile: 1-based lines and columns, end inclusive line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// First line (1-based).
    pub start_line: usize,
    /// Column on the first line (1-based).
    pub start_col: usize,
    /// Last line (1-based).
    pub end_line: usize,
    /// Column after the last character on the last line (1-based).
    pub end_col: usize,
}

impl Span {
    /// A span covering whole lines `start..=end` from column 1.
    pub fn lines(start: usize, end: usize) -> Span {
        Span { start_line: start, start_col: 1, end_line: end, end_col: 1 }
    }
}

/// A heredoc attached to an instruction (`RUN <<EOF ... EOF`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heredoc {
    /// The delimiter word, quotes removed.
    pub name: String,
    /// The file descriptor number written before `<<` (0 when none).
    pub file_descriptor: u64,
    /// Whether `$VAR`s in the body are expanded (delimiter not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are removed from body lines.
    pub chomp: bool,
    /// The body, each line with its line ending, without the delimiter.
    pub content: String,
}

/// An AST node. The root has one child per instruction; an instruction node
/// has the keyword as `value` (as written), its `--flags`, and its arguments
/// in `next` (BuildKit's `Next` chain, flattened). ONBUILD's argument is a
/// node whose single child is the nested instruction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Keyword (instruction nodes) or argument text.
    pub value: String,
    /// The arguments (BuildKit's `Next` chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next: Vec<Arg>,
    /// Instructions (root) or the nested instruction (ONBUILD argument).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
    /// Heredocs read after this instruction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heredocs: Vec<Heredoc>,
    /// The arguments were given in JSON (exec) form.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
    /// The logical line the instruction came from (continuations joined).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub original: String,
    /// `--flag` words, as written (quotes removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// Where it is (set on the root and on instructions).
    pub span: Span,
    /// Comment lines directly before the instruction, `#` removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prev_comment: Vec<String>,
}

/// One argument of an instruction (an element of BuildKit's `Next` chain):
/// a value, or for ONBUILD a nested instruction in `children`. Kept small
/// on purpose, as there are several per instruction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Arg {
    /// The argument text.
    pub value: String,
    /// ONBUILD: the nested instruction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

impl Arg {
    fn leaf(value: impl Into<String>) -> Arg {
        Arg { value: value.into(), children: Vec::new() }
    }

    fn dump_into(&self, s: &mut String) {
        if self.children.is_empty() {
            s.push_str(&quote(&self.value));
        } else {
            let mut inner = self.value.to_lowercase();
            for c in &self.children {
                inner.push('(');
                inner.push_str(&c.dump());
                inner.push_str(")\n");
            }
            s.push_str(inner.trim_matches(char::is_whitespace));
        }
    }
}

impl Node {

    /// The dump format of BuildKit's `Node.Dump()`: `(run "echo" "hi")` per
    /// instruction, keyword lower-cased, arguments Go-quoted.
    pub fn dump(&self) -> String {
        let mut s = self.value.to_lowercase();
        if !self.flags.is_empty() {
            s.push_str(" [");
            for (i, f) in self.flags.iter().enumerate() {
                if i > 0 {
                    s.push(' ');
                }
                s.push_str(&quote(f));
            }
            s.push(']');
        }
        for c in &self.children {
            s.push('(');
            s.push_str(&c.dump());
            s.push_str(")\n");
        }
        for n in &self.next {
            s.push(' ');
            n.dump_into(&mut s);
        }
        s.trim_matches(char::is_whitespace).to_string()
    }

    /// The argument values (the `next` chain's values).
    pub fn values(&self) -> Vec<&str> {
        self.next.iter().map(|n| n.value.as_str()).collect()
    }

    fn can_contain_heredoc(&self) -> bool {
        let mut node = self;
        if node.value.eq_ignore_ascii_case("onbuild")
            && let Some(first) = node.next.first()
            && let Some(c) = first.children.first()
        {
            node = c;
        }
        let v = node.value.to_ascii_lowercase();
        matches!(v.as_str(), "add" | "copy" | "run") && !node.json
    }
}

/// A parser warning (e.g. an empty continuation line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// One-line text.
    pub short: String,
    /// Further lines.
    pub detail: Vec<String>,
    /// Documentation link.
    pub url: String,
    /// Where.
    pub span: Span,
}

/// A parser directive (`# escape=`, `# syntax=`, `# check=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// Lower-cased name.
    pub name: String,
    /// Value as written.
    pub value: String,
    /// Line (1-based).
    pub line: usize,
}

/// What [`parse`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseResult {
    /// The root node (one child per instruction).
    pub ast: Node,
    /// The escape character in effect.
    pub escape_token: char,
    /// Warnings (empty continuation lines).
    pub warnings: Vec<Warning>,
    /// The parser directives found at the top.
    pub directives: Vec<Directive>,
}

const MAX_LINE: usize = 64 * 1024;

/// Go's `\s` in regular expressions: `[\t\n\f\r ]`.
fn is_go_re_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ')
}

/// BuildKit's `reWhitespace`: `[\t\v\f\r ]`.
fn is_re_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// The directive parser of BuildKit (`DirectiveParser`): recognises
/// `<comment> name = value` lines until the first line that is not one.
#[derive(Debug, Clone)]
pub struct DirectiveParser {
    line: usize,
    comment: &'static str,
    seen: Vec<String>,
    done: bool,
}

impl Default for DirectiveParser {
    fn default() -> Self {
        DirectiveParser { line: 0, comment: "#", seen: Vec::new(), done: false }
    }
}

/// Match `^<comment>\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`.
fn match_directive<'a>(comment: &str, line: &'a str) -> Option<(&'a str, &'a str)> {
    use nom::Parser;
    use nom::bytes::complete::{tag, take_while, take_while1};
    type E<'a> = nom::error::Error<&'a str>;
    let ws = || take_while::<_, &str, E>(is_go_re_space);
    let name = (
        take_while1::<_, &str, E>(|c: char| c.is_ascii_alphabetic()),
        take_while::<_, &str, E>(|c: char| c.is_ascii_alphanumeric()),
    );
    let mut p = (tag::<_, &str, E>(comment), ws(), nom::combinator::recognize(name), ws(), tag("="));
    let (rest, (_, _, key, _, _)) = p.parse(line).ok()?;
    // Lines reach here without their newline, so `.` never meets one.
    let trimmed = rest.trim_start_matches(is_go_re_space);
    let value = if trimmed.is_empty() {
        // `\s*` gives one whitespace character back to `(.+?)`.
        let last = rest.chars().last()?;
        &rest[rest.len() - last.len_utf8()..]
    } else {
        trimmed.trim_end_matches(is_go_re_space)
    };
    Some((key, value))
}

impl DirectiveParser {
    /// A parser for `//`-style comments (used by syntax detection).
    pub fn with_comment(comment: &'static str) -> Self {
        DirectiveParser { comment, ..DirectiveParser::default() }
    }

    /// Look at the next line; returns a directive if it is one.
    pub fn parse_line(&mut self, line: &str) -> Result<Option<Directive>, String> {
        self.line += 1;
        if self.done {
            return Ok(None);
        }
        let Some((key, value)) = match_directive(self.comment, line) else {
            self.done = true;
            return Ok(None);
        };
        let k = key.to_ascii_lowercase();
        if !matches!(k.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&k) {
            return Err(format!("only one {k} parser directive can be used"));
        }
        self.seen.push(k.clone());
        Ok(Some(Directive { name: k, value: value.to_string(), line: self.line }))
    }

    /// Parse all leading directives of `data` (BuildKit's `ParseAll`).
    pub fn parse_all(&mut self, data: &str) -> Result<Vec<Directive>, String> {
        let mut out = Vec::new();
        for line in scan_lines_stripped(data) {
            if self.done {
                break;
            }
            if let Some(d) = self.parse_line(line)? {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// Lines as Go's `bufio.ScanLines` yields them (`\n` and one `\r` before it
/// removed).
fn scan_lines_stripped(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, r) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        rest = r;
        Some(line.strip_suffix('\r').unwrap_or(line))
    })
}

/// A detected directive: the first word of the value, the whole value, and
/// its line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedDirective {
    /// First space-separated word of the value (e.g. the frontend image).
    pub reference: String,
    /// The whole value.
    pub cmdline: String,
    /// Line of the directive (1-based).
    pub line: usize,
}

/// BuildKit's `DetectSyntax`: find `# syntax=`, `// syntax=` or a JSON
/// `{"syntax": ...}`, after an optional BOM and shebang line.
pub fn detect_syntax(data: &str) -> Option<DetectedDirective> {
    parse_directive_impl("syntax", data, true)
}

/// BuildKit's `ParseDirective(key, data)`: only `# key=` form.
pub fn parse_directive(key: &str, data: &str) -> Option<DetectedDirective> {
    parse_directive_impl(key, data, false)
}

fn parse_directive_impl(key: &str, data: &str, any_format: bool) -> Option<DetectedDirective> {
    let data = data.strip_prefix('\u{feff}').unwrap_or(data);
    let (first, rest) = data.split_once('\n').unwrap_or((data, ""));
    let (data, line) = if first.starts_with("#!") { (rest, 1) } else { (data, 0) };
    let from_parser = |mut p: DirectiveParser| {
        p.line = line;
        let ds = p.parse_all(data).unwrap_or_default();
        ds.into_iter().find(|d| d.name == key).map(|d| DetectedDirective {
            reference: d.value.split(' ').next().unwrap_or("").to_string(),
            cmdline: d.value,
            line: d.line,
        })
    };
    if let Some(d) = from_parser(DirectiveParser::default()) {
        return Some(d);
    }
    if !any_format {
        return None;
    }
    if let Some(d) = from_parser(DirectiveParser::with_comment("//")) {
        return Some(d);
    }
    let map: std::collections::HashMap<String, serde_json::Value> = serde_json::from_str(data).ok()?;
    let v = map.get(key)?.as_str()?.to_string();
    Some(DetectedDirective { reference: v.clone(), cmdline: v, line })
}

/// Parse-time state: escape character and directive parser.
struct Directives {
    parser: DirectiveParser,
    escape: char,
    found: Vec<Directive>,
}

impl Directives {
    fn possible_directive(&mut self, line: &str) -> Result<(), String> {
        if let Some(d) = self.parser.parse_line(line)? {
            if d.name == "escape" {
                match d.value.as_str() {
                    "`" => self.escape = '`',
                    "\\" => self.escape = '\\',
                    v => return Err(format!("invalid escape token '{v}' does not match ` or \\")),
                }
            }
            self.found.push(d);
        }
        Ok(())
    }

    /// Strip a trailing escape character (plus trailing blanks); returns the
    /// rest and whether the logical line ends here.
    fn trim_continuation<'a>(&self, line: &'a str) -> (&'a str, bool) {
        // BuildKit's `([^\\])\\[ \t]*$` (or with `): the escape must not
        // itself be escaped; a lone escape on a line continues too.
        let t = line.trim_end_matches([' ', '\t']);
        match t.strip_suffix(self.escape) {
            Some(rest) if !rest.ends_with(self.escape) => (rest, false),
            _ => (line, true),
        }
    }
}

/// Go's `bufio.Scanner` with BuildKit's line splitter (line endings kept)
/// and the 64 KiB token limit.
struct LineScanner<'a> {
    data: &'a str,
    pos: usize,
    too_long: bool,
}

impl<'a> LineScanner<'a> {
    fn scan(&mut self) -> Option<&'a str> {
        if self.too_long || self.pos >= self.data.len() {
            return None;
        }
        let rest = &self.data[self.pos..];
        let len = match rest.find('\n') {
            Some(i) if i < MAX_LINE => i + 1,
            None if rest.len() < MAX_LINE => rest.len(),
            _ => {
                self.too_long = true;
                return None;
            }
        };
        self.pos += len;
        Some(&rest[..len])
    }
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Parse a Dockerfile (BuildKit's `Parse`).
pub fn parse(input: &[u8]) -> Result<ParseResult, FrontendError> {
    match std::str::from_utf8(input) {
        Ok(text) => parse_str(text),
        Err(_) => parse_str(&String::from_utf8_lossy(input)),
    }
}

fn parse_str(text: &str) -> Result<ParseResult, FrontendError> {
    let mut d = Directives { parser: DirectiveParser::default(), escape: '\\', found: Vec::new() };
    let mut sc = LineScanner { data: text, pos: 0, too_long: false };
    let mut current_line = 0usize;
    let mut root = Node::default();
    // One allocation for the instruction list: at most one per line.
    root.children.reserve(text.bytes().filter(|&b| b == b'\n').count() + 1);
    let mut have_child = false;
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut buf = String::new();
    let err_at = |msg: String, start: usize, end: usize| FrontendError::at(msg, Span::lines(start.max(1), end.max(start.max(1))));

    while let Some(raw) = sc.scan() {
        let raw = if current_line == 0 { raw.strip_prefix('\u{feff}').unwrap_or(raw) } else { raw };
        if is_comment(raw) {
            // BuildKit drops the line's first byte (not the `#`) and trims.
            let c = String::from_utf8_lossy(&raw.as_bytes()[1..]);
            let c = c.trim();
            if c.is_empty() {
                comments.clear();
            } else {
                comments.push(c.to_string());
            }
        }
        let token = trim_newline(raw).trim_start();
        d.possible_directive(token).map_err(|m| err_at(m, current_line + 1, current_line + 1))?;
        let first = if is_comment(token) { "" } else { token };
        current_line += 1;
        let start_line = current_line;
        let start_col = raw.chars().take_while(|c| c.is_whitespace()).count() + 1;
        // The last physical line of the instruction, for its end column.
        let mut last_line = raw;

        let (first, mut end_of_line) = d.trim_continuation(first);
        if end_of_line && first.is_empty() {
            continue;
        }
        buf.clear();
        buf.push_str(first);

        let mut has_empty = false;
        while !end_of_line {
            let Some(raw) = sc.scan() else { break };
            let token = trim_newline(raw);
            d.possible_directive(token).map_err(|m| err_at(m, current_line, current_line))?;
            current_line += 1;
            last_line = raw;
            if is_comment(raw) {
                continue;
            }
            if token.trim_start().is_empty() {
                has_empty = true;
                continue;
            }
            let (cont, eol) = d.trim_continuation(token);
            end_of_line = eol;
            buf.push_str(cont);
        }
        let line = buf.as_str();
        if has_empty {
            warnings.push(Warning {
                short: format!("Empty continuation line found in: {line}"),
                detail: vec!["Empty continuation lines will become errors in a future release".into()],
                url: "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/".into(),
                span: Span::lines(current_line, current_line),
            });
        }
        let mut child = new_node_from_line(line, d.escape, std::mem::take(&mut comments))
            .map_err(|m| err_at(m, start_line, current_line))?;
        if child.can_contain_heredoc() && line.contains("<<") {
            let docs = heredocs_from_line(line).map_err(|m| err_at(m, start_line, current_line))?;
            for mut doc in docs {
                let mut terminated = false;
                while let Some(raw) = sc.scan() {
                    current_line += 1;
                    let mut t = trim_newline(raw);
                    last_line = raw;
                    if doc.chomp {
                        t = t.trim_start_matches('\t');
                    }
                    if t == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    return Err(err_at(format!("unterminated heredoc {}", doc.name), start_line, current_line)
                        .with_source(text));
                }
                child.heredocs.push(doc);
            }
        }
        let last = trim_newline(last_line);
        let end_col = if last.is_ascii() { last.len() } else { last.chars().count() } + 1;
        child.span = Span { start_line, start_col, end_line: current_line, end_col };
        if !have_child {
            root.span.start_line = start_line;
            root.span.start_col = 1;
            have_child = true;
        }
        root.span.end_line = current_line;
        root.span.end_col = end_col;
        root.children.push(child);
    }
    if !have_child {
        return Err(FrontendError::at("file with no instructions", Span::lines(current_line.max(1), current_line.max(1))));
    }
    if sc.too_long {
        return Err(FrontendError::at(
            format!("dockerfile line greater than max allowed size of {}", MAX_LINE - 1),
            Span::lines(current_line + 1, current_line + 1),
        ));
    }
    Ok(ParseResult { ast: root, escape_token: d.escape, warnings, directives: d.found })
}

/// Split a logical line into keyword, flags and the rest, then shape the
/// arguments per instruction (BuildKit's `newNodeFromLine`).
fn new_node_from_line(line: &str, escape: char, comments: Vec<String>) -> Result<Node, String> {
    let (cmd, flags, args) = split_command(line);
    let mut lower = [0u8; 12];
    let key = if cmd.len() <= lower.len() {
        lower[..cmd.len()].copy_from_slice(cmd.as_bytes());
        lower[..cmd.len()].make_ascii_lowercase();
        std::str::from_utf8(&lower[..cmd.len()]).unwrap_or("")
    } else {
        ""
    };
    let (next, json) = match key {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(args)?,
        "arg" => (parse_word_slices(args, escape).into_iter().map(Arg::leaf).collect(), false),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(args)?,
        "env" => (parse_name_val(args, "ENV", escape)?, false),
        "label" => (parse_name_val(args, "LABEL", escape)?, false),
        "expose" | "from" => (parse_whitespace_delimited(args), false),
        "healthcheck" => parse_health_config(args)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => (parse_string(args), false),
        "onbuild" => {
            if args.is_empty() {
                (Vec::new(), false)
            } else {
                let child = new_node_from_line(args, escape, Vec::new())?;
                (vec![Arg { value: String::new(), children: vec![child] }], false)
            }
        }
        // BuildKit's parser keeps unknown instructions (with one empty
        // argument); they are rejected when typed.
        _ => (vec![Arg::default()], false),
    };
    Ok(Node {
        value: cmd.to_string(),
        original: line.to_string(),
        flags,
        next,
        json,
        prev_comment: comments,
        ..Node::default()
    })
}

/// Keyword, flags, rest (BuildKit's `splitCommand`).
fn split_command(line: &str) -> (&str, Vec<String>, &str) {
    let line = line.trim();
    match line.find(is_re_ws) {
        None => (line, Vec::new(), ""),
        Some(i) => {
            let cmd = &line[..i];
            let rest = line[i..].trim_start_matches(is_re_ws);
            let (args, flags) = extract_builder_flags(rest);
            (cmd, flags, args.trim())
        }
    }
}

/// Go's `unicode.IsSpace` applied to a single byte taken as a rune (BuildKit
/// does so in its flag scanner).
fn byte_is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0)
}

/// Leading `--flag` words of `line` and the remaining text
/// (BuildKit's `extractBuilderFlags`). Like BuildKit, bytes are read one at
/// a time and each byte is taken as a character (so non-ASCII flag text is
/// re-encoded as Latin-1).
fn extract_builder_flags(line: &str) -> (&str, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let b = line.as_bytes();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    let mut ch = 0u8;
    while pos <= b.len() {
        if pos != b.len() {
            ch = b[pos];
        }
        if phase == Phase::Spaces {
            if pos == b.len() {
                break;
            }
            if byte_is_space(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                return (safe_tail(line, pos), words);
            }
            phase = Phase::Word;
        }
        if pos == b.len() {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if byte_is_space(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (safe_tail(line, pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
        } else if ch == quote {
            // In quotes: the closing quote ends them.
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        // In a word or in quotes alike, a backslash takes the next byte as it is;
        // a trailing one is dropped (the end of the line then closes the word).
        if ch == b'\\' {
            if pos + 1 == b.len() {
                pos += 1;
                continue;
            }
            pos += 1;
            ch = b[pos];
        }
        word.push(ch as char);
        pos += 1;
    }
    ("", words)
}

/// `&s[pos..]`, moved forward to a character boundary when `pos` falls
/// inside a multi-byte character (possible only after a non-ASCII space
/// byte, which cannot start a UTF-8 character).
fn safe_tail(s: &str, mut pos: usize) -> &str {
    while !s.is_char_boundary(pos) {
        pos += 1;
    }
    &s[pos..]
}

/// Split on whitespace keeping quotes and escapes (BuildKit's `parseWords`).
pub fn parse_words(rest: &str, escape: char) -> Vec<String> {
    parse_word_slices(rest, escape).into_iter().map(str::to_string).collect()
}

/// [`parse_words`] without copying: every character BuildKit appends to a
/// word is the next one of the input (an escape is kept together with the
/// character it escapes; only a final, dangling escape is dropped), so each
/// word is a slice `rest[start..end]`.
fn parse_word_slices(rest: &str, escape: char) -> Vec<&str> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let mut words = Vec::with_capacity(4);
    let mut phase = Phase::Spaces;
    let (mut start, mut end) = (0usize, 0usize);
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut it = rest.char_indices();
    loop {
        let cur = it.next();
        if phase == Phase::Spaces {
            let Some((i, ch)) = cur else { break };
            if ch.is_whitespace() {
                continue;
            }
            phase = Phase::Word;
            start = i;
            end = i;
        }
        let Some((i, ch)) = cur else {
            if blank_ok || end > start {
                words.push(&rest[start..end]);
            }
            break;
        };
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || end > start {
                    words.push(&rest[start..end]);
                }
                blank_ok = false;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            end = i + ch.len_utf8();
            if ch == escape {
                match it.next() {
                    None => {
                        end = i;
                        continue;
                    }
                    Some((j, n)) => end = j + n.len_utf8(),
                }
            }
            continue;
        }
        // In quotes.
        if ch == quote {
            phase = Phase::Word;
        }
        end = i + ch.len_utf8();
        if ch == escape && quote != '\'' {
            match it.next() {
                None => {
                    end = i;
                    phase = Phase::Word;
                    continue;
                }
                Some((j, n)) => end = j + n.len_utf8(),
            }
        }
    }
    words
}

/// ENV/LABEL arguments as `key value sep` triples (BuildKit's
/// `parseNameVal`): `k=v ...` gives sep `=`, legacy `k v` gives sep ``.
pub fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<Arg>, String> {
    let words = parse_word_slices(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let Some(i) = rest.find(is_re_ws) else {
            return Err(format!("{key} must have two arguments"));
        };
        let name = &rest[..i];
        let value = rest[i..].trim_start_matches(is_re_ws);
        return Ok(vec![Arg::leaf(name), Arg::leaf(value), Arg::leaf("")]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                quote(w)
            ));
        };
        out.push(Arg::leaf(k));
        out.push(Arg::leaf(v));
        out.push(Arg::leaf("="));
    }
    Ok(out)
}

fn parse_whitespace_delimited(rest: &str) -> Vec<Arg> {
    if rest.is_empty() {
        return Vec::new();
    }
    // Go's `regexp.Split` on `[\t\v\f\r ]+`: each run of separators splits once.
    let mut out = Vec::with_capacity(4);
    let mut start = 0;
    let mut in_sep = false;
    for (i, c) in rest.char_indices() {
        if is_re_ws(c) {
            if !in_sep {
                out.push(Arg::leaf(&rest[start..i]));
                in_sep = true;
            }
        } else if in_sep {
            start = i;
            in_sep = false;
        }
    }
    out.push(Arg::leaf(if in_sep { "" } else { &rest[start..] }));
    out
}

fn parse_string(rest: &str) -> Vec<Arg> {
    if rest.is_empty() { Vec::new() } else { vec![Arg::leaf(rest)] }
}

/// Why [`parse_json`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON, or not an array: callers fall back to shell form.
    NotJson,
    /// A JSON array with a non-string element: an error.
    NotStringArray,
}

/// The message of [`JsonError::NotStringArray`].
pub const NOT_STRING_ARRAY: &str = "when using JSON array syntax, arrays must be comprised of strings only";

/// Parse a JSON array of strings (BuildKit's `parseJSON`).
pub fn parse_json(rest: &str) -> Result<Vec<Arg>, JsonError> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Err(JsonError::NotJson);
    }
    let values = json::string_array(rest).ok_or(JsonError::NotJson)?;
    values.into_iter().map(|v| v.map(Arg::leaf).ok_or(JsonError::NotStringArray)).collect()
}

/// A small JSON reader with Go `encoding/json` rules (whitespace, number
/// syntax, escapes; a lone surrogate escape becomes U+FFFD), specialised
/// for "an array whose elements should be strings".
mod json {
    struct R<'a> {
        b: &'a [u8],
        s: &'a str,
        i: usize,
        depth: usize,
    }

    /// `Some(elements)` for a syntactically valid JSON array (non-string
    /// elements as `None`), `None` for anything that is not valid JSON.
    pub fn string_array(s: &str) -> Option<Vec<Option<String>>> {
        let mut r = R { b: s.as_bytes(), s, i: 0, depth: 0 };
        r.ws();
        if r.b.get(r.i) != Some(&b'[') {
            return None;
        }
        r.i += 1;
        let mut out = Vec::new();
        r.ws();
        if r.b.get(r.i) == Some(&b']') {
            r.i += 1;
        } else {
            loop {
                r.ws();
                if r.b.get(r.i) == Some(&b'"') {
                    out.push(Some(r.string()?));
                } else {
                    r.value()?;
                    out.push(None);
                }
                r.ws();
                match r.b.get(r.i) {
                    Some(b',') => r.i += 1,
                    Some(b']') => {
                        r.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        r.ws();
        (r.i == r.b.len()).then_some(out)
    }

    impl R<'_> {
        fn ws(&mut self) {
            while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.i += 1;
            }
        }

        fn lit(&mut self, l: &str) -> Option<()> {
            self.b[self.i..].starts_with(l.as_bytes()).then(|| self.i += l.len())
        }

        fn value(&mut self) -> Option<()> {
            self.ws();
            match *self.b.get(self.i)? {
                b'"' => self.string().map(|_| ()),
                b't' => self.lit("true"),
                b'f' => self.lit("false"),
                b'n' => self.lit("null"),
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > 10000 {
                        return None;
                    }
                    let close = if self.b[self.i] == b'[' { b']' } else { b'}' };
                    self.i += 1;
                    self.ws();
                    if self.b.get(self.i) == Some(&close) {
                        self.i += 1;
                    } else {
                        loop {
                            if close == b'}' {
                                self.ws();
                                if self.b.get(self.i) != Some(&b'"') {
                                    return None;
                                }
                                self.string()?;
                                self.ws();
                                if self.b.get(self.i) != Some(&b':') {
                                    return None;
                                }
                                self.i += 1;
                            }
                            self.value()?;
                            self.ws();
                            match self.b.get(self.i) {
                                Some(b',') => self.i += 1,
                                Some(c) if *c == close => {
                                    self.i += 1;
                                    break;
                                }
                                _ => return None,
                            }
                        }
                    }
                    self.depth -= 1;
                    Some(())
                }
                _ => self.number(),
            }
        }

        fn digits(&mut self) -> usize {
            let start = self.i;
            while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            self.i - start
        }

        fn number(&mut self) -> Option<()> {
            if self.b.get(self.i) == Some(&b'-') {
                self.i += 1;
            }
            match self.b.get(self.i) {
                Some(b'0') => self.i += 1,
                Some(b'1'..=b'9') => {
                    self.digits();
                }
                _ => return None,
            }
            if self.b.get(self.i) == Some(&b'.') {
                self.i += 1;
                if self.digits() == 0 {
                    return None;
                }
            }
            if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
                self.i += 1;
                if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                    self.i += 1;
                }
                if self.digits() == 0 {
                    return None;
                }
            }
            Some(())
        }

        fn hex4(&mut self) -> Option<u32> {
            let h = self.s.get(self.i..self.i + 4)?;
            if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            self.i += 4;
            u32::from_str_radix(h, 16).ok()
        }

        fn string(&mut self) -> Option<String> {
            self.i += 1; // opening quote
            let mut out = String::new();
            let mut run = self.i;
            loop {
                let c = *self.b.get(self.i)?;
                match c {
                    b'"' => {
                        out.push_str(&self.s[run..self.i]);
                        self.i += 1;
                        return Some(out);
                    }
                    0..=0x1f => return None,
                    b'\\' => {
                        out.push_str(&self.s[run..self.i]);
                        self.i += 1;
                        let e = *self.b.get(self.i)?;
                        self.i += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let u = self.hex4()?;
                                if (0xD800..0xDC00).contains(&u)
                                    && self.b.get(self.i) == Some(&b'\\')
                                    && self.b.get(self.i + 1) == Some(&b'u')
                                {
                                    let save = self.i;
                                    self.i += 2;
                                    match self.hex4() {
                                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                                            let c = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                                            out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                                        }
                                        _ => {
                                            self.i = save;
                                            out.push('\u{fffd}');
                                        }
                                    }
                                } else {
                                    out.push(char::from_u32(u).unwrap_or('\u{fffd}'));
                                }
                            }
                            _ => return None,
                        }
                        run = self.i;
                    }
                    _ => self.i += 1,
                }
            }
        }
    }
}

fn parse_maybe_json(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonError::NotStringArray) => Err(NOT_STRING_ARRAY.into()),
        Err(JsonError::NotJson) => Ok((vec![Arg::leaf(rest)], false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonError::NotStringArray) => Err(NOT_STRING_ARRAY.into()),
        Err(JsonError::NotJson) => Ok((parse_whitespace_delimited(rest), false)),
    }
}

fn parse_health_config(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    let b = rest.as_bytes();
    let sep = b.iter().position(|&c| byte_is_space(c)).unwrap_or(b.len());
    if sep == 0 {
        return Ok((Vec::new(), false));
    }
    let next = b[sep..].iter().position(|&c| !byte_is_space(c)).map_or(b.len(), |i| sep + i);
    let typ = &rest[..sep];
    let (cmd, json) = parse_maybe_json(safe_tail(rest, next))?;
    let mut out = vec![Arg::leaf(typ)];
    out.extend(cmd);
    Ok((out, json))
}

/// Match `^(\d*)<<(-?)([^<]*)$` and read the heredoc word (BuildKit's
/// `ParseHeredoc`). `Ok(None)`: not a heredoc.
pub fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, String> {
    let digits = src.bytes().take_while(u8::is_ascii_digit).count();
    let Some(after) = src[digits..].strip_prefix("<<") else { return Ok(None) };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    if rest.contains('<') {
        return Ok(None);
    }
    // The regexp is `^(\d*)<<(-?)\s*([^<]*)$`.
    let rest = rest.trim_start_matches(is_go_re_space);
    let fd = if digits == 0 { 0 } else { src[..digits].parse::<u64>().unwrap_or(u64::MAX) };
    if rest.is_empty() {
        return Ok(None);
    }
    let mut lex = Lex::new('\\');
    lex.skip_unset_env = true;
    let words = lex.process_words(rest, &EmptyEnv).map_err(|e| e.0)?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let raw = lex.process_words(rest, &EmptyEnv).map_err(|e| e.0)?;
    if raw.len() != words.len() {
        return Err(format!("internal lexing of heredoc produced inconsistent results: {rest}"));
    }
    let count = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = count(&words[0]) == count(&raw[0]);
    Ok(Some(Heredoc { name: words[0].clone(), file_descriptor: fd, expand, chomp, content: String::new() }))
}

/// All heredocs started on `line` (BuildKit's `heredocsFromLine`).
pub fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let mut lex = Lex::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let words = lex.process_words(line, &EmptyEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for w in words {
        if let Some(h) = parse_heredoc(&w)? {
            docs.push(h);
        }
    }
    Ok(docs)
}

/// Remove leading tabs from every line (BuildKit's `ChompHeredocContent`).
pub fn chomp_heredoc_content(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.split_inclusive('\n') {
        out.push_str(line.trim_start_matches('\t'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_flags_quotes_and_backslashes() {
        let flags = |line| {
            let (rest, words) = extract_builder_flags(line);
            (rest.to_string(), words)
        };
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(flags("--a=\"x y\" --b=\\z rest"), ("rest".into(), w(&["--a=x y", "--b=z"])));
        assert_eq!(flags("--a='q\\'x' tail"), ("tail".into(), w(&["--a=q'x"])));
        assert_eq!(flags("--a=x\\"), (String::new(), w(&["--a=x"])));
        assert_eq!(flags("--a=\"x\\"), (String::new(), w(&["--a=x"])));
        assert_eq!(flags("--a=\"\" -- rest"), (" rest".into(), w(&["--a="])));
    }

    #[test]
    fn parses_and_dumps() {
        let r = parse(b"FROM busybox AS b\nRUN --mount=type=cache,target=/x echo \\\n  hi\nENV A=1 B=2\n").unwrap();
        assert_eq!(r.ast.children.len(), 3);
        assert_eq!(
            r.ast.dump(),
            "(from \"busybox\" \"AS\" \"b\")\n(run [\"--mount=type=cache,target=/x\"] \"echo   hi\")\n(env \"A\" \"1\" \"=\" \"B\" \"2\" \"=\")"
        );
        assert_eq!(r.ast.children[1].span, Span { start_line: 2, start_col: 1, end_line: 3, end_col: 5 });
    }

    #[test]
    fn bom_crlf_backtick_escape_and_comments_in_continuations() {
        let src = "\u{feff}# escape=`\r\n\r\nFROM a\r\nRUN echo \\ `\r\n# comment\r\n  b\r\ncopy <<-EOT /x\r\n\thi\r\n\tEOT\r\n";
        let r = parse(src.as_bytes()).unwrap();
        assert_eq!(r.escape_token, '`');
        assert_eq!(r.directives[0].name, "escape");
        assert_eq!(r.ast.dump(), "(from \"a\")\n(run \"echo \\\\   b\")\n(copy \"<<-EOT\" \"/x\")");
        assert_eq!(r.ast.children[1].span, Span { start_line: 4, start_col: 1, end_line: 6, end_col: 4 });
        let h = &r.ast.children[2].heredocs[0];
        assert_eq!((h.name.as_str(), h.content.as_str(), h.chomp), ("EOT", "\thi\r\n", true));
        // A directive after an instruction is just a comment.
        let r = parse(b"FROM a\n# escape=`\nRUN x \\\n y\n").unwrap();
        assert_eq!(r.escape_token, '\\');
        assert!(parse(b"# escape=x\nFROM a\n").is_err());
        assert!(parse(b"# escape=`\n# escape=`\nFROM a\n").is_err());
    }

    #[test]
    fn json_arrays_follow_go_rules() {
        let v = |s: &str| parse_json(s).map(|a| a.into_iter().map(|a| a.value).collect::<Vec<_>>());
        assert_eq!(v(r#"["a\u00e9\ud83d\ude00", "\/"]"#).unwrap(), ["aé😀", "/"]);
        assert_eq!(v(r#"["\ud800x"]"#).unwrap(), ["\u{fffd}x"], "lone surrogate becomes U+FFFD");
        assert_eq!(v("[1, {\"a\": [true, null]}]"), Err(JsonError::NotStringArray));
        assert_eq!(v("[\"a\" \"b\"]"), Err(JsonError::NotJson));
        assert_eq!(v("[01]"), Err(JsonError::NotJson));
        assert_eq!(v("[\"a\"] x"), Err(JsonError::NotJson));
        assert_eq!(v("[\"\t\"]"), Err(JsonError::NotJson), "raw control character");
        assert_eq!(v(" [ ] ").unwrap(), Vec::<String>::new());
    }

    /// BuildKit's `parseWords` transcribed literally (a character at a
    /// time), to check the allocation-free version against.
    fn parse_words_reference(rest: &str, escape: char) -> Vec<String> {
        let (mut words, mut word) = (Vec::new(), String::new());
        let (mut phase, mut quote, mut blank_ok) = (0, '\0', false);
        let chars: Vec<char> = rest.chars().collect();
        let mut pos = 0;
        while pos <= chars.len() {
            let ch = chars.get(pos).copied().unwrap_or('\0');
            if phase == 0 {
                if pos == chars.len() {
                    break;
                }
                if ch.is_whitespace() {
                    pos += 1;
                    continue;
                }
                phase = 1;
            }
            if pos == chars.len() {
                if blank_ok || !word.is_empty() {
                    words.push(word.clone());
                }
                break;
            }
            let mut ch = ch;
            if phase == 1 {
                if ch.is_whitespace() {
                    phase = 0;
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = ch;
                    blank_ok = true;
                    phase = 2;
                }
                if ch == escape {
                    if pos + 1 == chars.len() {
                        pos += 1;
                        continue;
                    }
                    word.push(ch);
                    pos += 1;
                    ch = chars[pos];
                }
                word.push(ch);
                pos += 1;
                continue;
            }
            if ch == quote {
                phase = 1;
            }
            if ch == escape && quote != '\'' {
                if pos + 1 == chars.len() {
                    phase = 1;
                    pos += 1;
                    continue;
                }
                pos += 1;
                word.push(ch);
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
        }
        words
    }

    proptest::proptest! {
        #[test]
        fn word_slices_match_buildkit_parse_words(
            s in proptest::collection::vec(proptest::sample::select(vec!["a", "b", " ", "\t", "'", "\"", "\\", "`", "é", "=", "\u{a0}"]), 0..24)
        ) {
            let s = s.concat();
            for esc in ['\\', '`'] {
                proptest::prop_assert_eq!(parse_words(&s, esc), parse_words_reference(&s, esc));
            }
        }
    }

    #[test]
    fn whitespace_split_merges_runs() {
        let v: Vec<String> = parse_whitespace_delimited("a  b\t c").into_iter().map(|n| n.value).collect();
        assert_eq!(v, ["a", "b", "c"]);
    }
}

//! The shell-word lexer: BuildKit's variable expansion and word splitting
//! (`frontend/dockerfile/shell/lex.go`), with its exact semantics.
//!
//! [`Lex::process_word`] expands `$VAR`, `${VAR}`, `${VAR:-w}`, `${VAR-w}`,
//! `${VAR:+w}`, `${VAR+w}`, `${VAR:?msg}`, `${VAR?msg}`, `${VAR#pat}`,
//! `${VAR##pat}`, `${VAR%pat}`, `${VAR%%pat}`, `${VAR/pat/repl}` and
//! `${VAR//pat/repl}`, removes quotes and escapes (with the active escape
//! character), and keeps spaces. [`Lex::process_words`] does the same and then
//! splits into words. [`Lex::process_word_with_matches`] also reports which
//! variables were found and which were referenced but unset.

use std::collections::{BTreeSet, HashMap};

/// Where the lexer looks variables up.
pub trait EnvGetter {
    /// The value of `key`, or `None` when unset.
    fn get(&self, key: &str) -> Option<&str>;
    /// All keys, in declaration order.
    fn keys(&self) -> Vec<String>;
}

/// An environment built from `KEY=VALUE` entries (BuildKit's
/// `EnvsFromSlice`): split at the first `=`, later duplicates win, an entry
/// without `=` sets the key to the empty string.
#[derive(Debug, Clone, Default)]
pub struct EnvList {
    map: HashMap<String, String>,
    keys: Vec<String>,
}

impl EnvList {
    /// Build from `KEY=VALUE` strings.
    pub fn from_slice<S: AsRef<str>>(entries: &[S]) -> Self {
        let mut env = EnvList::default();
        for e in entries {
            let (k, v) = e.as_ref().split_once('=').unwrap_or((e.as_ref(), ""));
            env.keys.push(k.to_string());
            env.map.insert(k.to_string(), v.to_string());
        }
        env
    }
}

impl EnvGetter for EnvList {
    fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<String> {
        self.keys.clone()
    }
}

impl EnvGetter for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = HashMap::keys(self).cloned().collect();
        k.sort();
        k
    }
}

/// An environment with nothing set.
pub struct EmptyEnv;

impl EnvGetter for EmptyEnv {
    fn get(&self, _key: &str) -> Option<&str> {
        None
    }
    fn keys(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A lexer error; the text is BuildKit's (`failed to process "...": ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LexError(pub String);

/// Everything one expansion produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessWordResult {
    /// The expanded word (spaces kept).
    pub result: String,
    /// The expanded word split into words.
    pub words: Vec<String>,
    /// Variables that were looked up and set.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and unset.
    pub unmatched: BTreeSet<String>,
}

/// BuildKit's shell lexer with its options.
#[derive(Debug, Clone)]
pub struct Lex {
    /// The escape character (`\` or `` ` ``).
    pub escape_token: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as they were written.
    pub skip_unset_env: bool,
}

impl Lex {
    /// A lexer with the given escape character and default options.
    pub fn new(escape_token: char) -> Self {
        Lex { escape_token, raw_quotes: false, raw_escapes: false, skip_process_quotes: false, skip_unset_env: false }
    }

    /// Expand `word`; returns the result and the unset variables referenced.
    pub fn process_word(&self, word: &str, env: &dyn EnvGetter) -> Result<(String, BTreeSet<String>), LexError> {
        let r = self.process(word, env, true)?;
        Ok((r.result, r.unmatched))
    }

    /// Expand `word` and split it into words.
    pub fn process_words(&self, word: &str, env: &dyn EnvGetter) -> Result<Vec<String>, LexError> {
        Ok(self.process(word, env, false)?.words)
    }

    /// Expand `word`, reporting matched and unmatched variables.
    pub fn process_word_with_matches(&self, word: &str, env: &dyn EnvGetter) -> Result<ProcessWordResult, LexError> {
        self.process(word, env, true)
    }

    fn process(&self, word: &str, env: &dyn EnvGetter, capture: bool) -> Result<ProcessWordResult, LexError> {
        let mut sw = ShellWord {
            lex: self,
            sc: Scanner::new(word),
            env,
            raw_escapes: self.raw_escapes,
            capture,
            words_buf: String::new(),
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(ProcessWordResult { result, words, matched: sw.matched, unmatched: sw.unmatched }),
            Err(e) => Err(LexError(format!("failed to process {}: {}", crate::goquote::quote(word), e))),
        }
    }
}

/// Character cursor with Go `text/scanner` `Peek`/`Next` behaviour (a
/// leading byte-order mark is skipped).
struct Scanner<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(s: &'a str) -> Self {
        let s = s.strip_prefix('\u{feff}').unwrap_or(s);
        Scanner { s, pos: 0 }
    }
    #[inline]
    fn peek(&self) -> Option<char> {
        let b = *self.s.as_bytes().get(self.pos)?;
        if b < 0x80 { Some(b as char) } else { self.s[self.pos..].chars().next() }
    }
    #[inline]
    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }
}

/// Go's `string(rune)` for a scanner result: EOF prints as U+FFFD.
fn ch_str(c: Option<char>) -> char {
    c.unwrap_or('\u{fffd}')
}

struct ShellWord<'a> {
    lex: &'a Lex,
    sc: Scanner<'a>,
    env: &'a dyn EnvGetter,
    raw_escapes: bool,
    capture: bool,
    /// The word being collected. Shared by nested `process_stop_on` calls
    /// exactly as BuildKit shares `shellWord.wordsBuffer`: a nested
    /// `${x:-...}` resets it, dropping a partial outer word.
    words_buf: String,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

#[derive(Default)]
struct Words {
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, buf: &mut String, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !buf.is_empty() {
                self.words.push(std::mem::take(buf));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(buf, ch);
        }
    }
    fn add_raw_char(&mut self, buf: &mut String, ch: char) {
        buf.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, buf: &mut String, s: &str) {
        for c in s.chars() {
            self.add_char(buf, c);
        }
    }
    fn add_raw_string(&mut self, buf: &mut String, s: &str) {
        buf.push_str(s);
        self.in_word = true;
    }
    fn get_words(mut self, buf: &mut String) -> Vec<String> {
        if !buf.is_empty() {
            self.words.push(std::mem::take(buf));
        }
        self.words
    }
}

impl ShellWord<'_> {
    fn process_stop_on(&mut self, stop: Option<char>, raw_escapes: bool) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        self.words_buf.clear();
        let mut words = Words::default();
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.stop_on_inner(stop, &mut result, &mut words);
        self.raw_escapes = saved;
        r?;
        let mut buf = std::mem::take(&mut self.words_buf);
        let w = words.get_words(&mut buf);
        self.words_buf = buf;
        Ok((result, w))
    }

    fn stop_on_inner(&mut self, stop: Option<char>, result: &mut String, words: &mut Words) -> Result<(), String> {
        let quotes = !self.lex.skip_process_quotes;
        while let Some(ch) = self.sc.peek() {
            if stop == Some(ch) {
                self.sc.next();
                return Ok(());
            }
            if ch == '$' || ch == '<' || (quotes && (ch == '\'' || ch == '"')) {
                let tmp = match ch {
                    '$' => self.process_dollar()?,
                    '<' => self.process_possible_heredoc(),
                    '\'' => self.process_single_quote()?,
                    _ => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                let mut buf = std::mem::take(&mut self.words_buf);
                if ch == '$' {
                    words.add_string(&mut buf, &tmp);
                } else {
                    words.add_raw_string(&mut buf, &tmp);
                }
                self.words_buf = buf;
            } else {
                let mut ch = self.sc.next().expect("peeked");
                if ch == self.lex.escape_token {
                    if self.raw_escapes {
                        words.add_raw_char(&mut self.words_buf, ch);
                        result.push(ch);
                    }
                    match self.sc.next() {
                        None => break,
                        Some(c) => ch = c,
                    }
                    words.add_raw_char(&mut self.words_buf, ch);
                } else {
                    words.add_char(&mut self.words_buf, ch);
                }
                result.push(ch);
            }
        }
        if let Some(stop) = stop {
            return Err(format!("unexpected end of statement while looking for matching {stop}"));
        }
        Ok(())
    }

    /// `<<`, `<<-` and the blanks after them stay one word with the
    /// delimiter that follows (`<<  EOF` is one heredoc word).
    fn process_possible_heredoc(&mut self) -> String {
        self.sc.next();
        if self.sc.peek() != Some('<') {
            return "<".into();
        }
        self.sc.next();
        let mut out = String::from("<<");
        if self.sc.peek() == Some('-') {
            self.sc.next();
            out.push('-');
        }
        while let Some(c @ (' ' | '\t')) = self.sc.peek() {
            out.push(c);
            self.sc.next();
        }
        out
    }

    fn process_single_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.sc.next();
        if self.lex.raw_quotes {
            result.push(ch_str(open));
        }
        loop {
            match self.sc.next() {
                None => return Err("unexpected end of statement while looking for matching single-quote".into()),
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.sc.next();
        if self.lex.raw_quotes {
            result.push(ch_str(open));
        }
        loop {
            match self.sc.peek() {
                None => return Err("unexpected end of statement while looking for matching double-quote".into()),
                Some('"') => {
                    self.sc.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                }
                Some(_) => {
                    let mut ch = self.sc.next().expect("peeked");
                    if ch == self.lex.escape_token {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.sc.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape_token => {
                                ch = self.sc.next().expect("peeked");
                            }
                            _ => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Result<String, String> {
        self.sc.next();
        if self.sc.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.sc.next();
        match self.sc.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            _ => {}
        }
        let name = self.process_name();
        let mut ch = self.sc.next();
        let mut chs = String::from(ch_str(ch));
        let mut null_is_unset = false;
        match ch {
            Some('}') => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(':' | '+' | '-' | '?' | '#' | '%') => {
                if ch == Some(':') {
                    null_is_unset = true;
                    ch = self.sc.next();
                    chs.push(ch_str(ch));
                }
                let raw = matches!(ch, Some('#' | '%'));
                if null_is_unset && raw {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let mut word = self.word_until_closing(Some('}'), raw, "syntax error: missing '}'")?;
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let set = value.is_some();
                let value = value.unwrap_or_default();
                match ch {
                    Some('-') => Ok(if !set || (null_is_unset && value.is_empty()) { word } else { value }),
                    Some('+') => Ok(if !set || (null_is_unset && value.is_empty()) { String::new() } else { word }),
                    Some('?') => {
                        if !set {
                            let m = if word.is_empty() { "is not allowed to be unset".into() } else { word };
                            return Err(format!("{name}: {m}"));
                        }
                        if null_is_unset && value.is_empty() {
                            let m = if word.is_empty() { "is not allowed to be empty".into() } else { word };
                            return Err(format!("{name}: {m}"));
                        }
                        Ok(value)
                    }
                    Some(c @ ('%' | '#')) => {
                        let mut greedy = false;
                        if word.starts_with(c) {
                            greedy = true;
                            word.remove(0);
                        }
                        if c == '%' { trim_suffix(&word, &value, greedy) } else { trim_prefix(&word, &value, greedy) }
                    }
                    _ => Err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            Some('/') => {
                let replace_all = self.sc.peek() == Some('/');
                if replace_all {
                    self.sc.next();
                }
                let pattern = self.word_until_closing(Some('/'), true, "syntax error: missing '/' in ${}")?;
                let replacement = self.word_until_closing(Some('}'), true, "syntax error: missing '}'")?;
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let re = convert_shell_pattern_to_regex(&pattern, true, false)
                    .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                let re = compile(&re).map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                if replace_all {
                    Ok(re.replace_all(&value, replacement.as_str()).into_owned())
                } else if let Some(m) = re.find(&value) {
                    Ok(format!("{}{}{}", &value[..m.start()], replacement, &value[m.end()..]))
                } else {
                    Ok(value)
                }
            }
            _ => Err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }

    /// Reads a word up to `stop` inside `${...}`; an error at the end of input means the
    /// closing character is missing, so it becomes `missing_msg`.
    fn word_until_closing(&mut self, stop: Option<char>, raw: bool, missing_msg: &str) -> Result<String, String> {
        match self.process_stop_on(stop, raw) {
            Ok((word, _)) => Ok(word),
            Err(_) if self.sc.peek().is_none() => Err(missing_msg.to_string()),
            Err(e) => Err(e),
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.sc.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(c) = self.sc.peek() {
                    if !is_digit(c) {
                        break;
                    }
                    name.push(c);
                    self.sc.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.sc.next();
                return ch.to_string();
            }
            if !ch.is_alphabetic() && !is_digit(ch) && ch != '_' {
                break;
            }
            name.push(ch);
            self.sc.next();
        }
        name
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.get(name) {
            Some(v) => {
                if self.capture {
                    self.matched.insert(name.to_string());
                }
                Some(v.to_string())
            }
            None => {
                if self.capture {
                    self.unmatched.insert(name.to_string());
                }
                None
            }
        }
    }
}

/// Go's `unicode.IsDigit` (decimal digits), approximated by Rust's numeric
/// test restricted to characters with a decimal value or outside ASCII.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// BuildKit's `convertShellPatternToRegex`: a shell wildcard pattern (`?`,
/// `*`, `\` escapes; no bracket expressions) as regular-expression source
/// text, exactly as Go's `regexp.String()` would print it.
pub fn convert_shell_pattern_to_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<String, String> {
    let mut s = Scanner::new(pattern);
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    while let Some(tok) = s.next() {
        let mut tok = tok;
        match tok {
            '*' => {
                out.push_str(star);
                continue;
            }
            '?' => {
                out.push('.');
                continue;
            }
            '\\' => {
                if matches!(s.peek(), Some('}' | '/')) {
                    continue;
                }
                out.push('\\');
                let next = s.next();
                match next {
                    Some(c @ ('*' | '?' | '\\')) => tok = c,
                    other => return Err(format!("invalid escape '\\{}'", ch_str(other))),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' => out.push('\\'),
            _ => {}
        }
        out.push(tok);
    }
    Ok(out)
}

fn compile(src: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(src).map_err(|e| e.to_string())
}

/// BuildKit's `reversePattern`: reverse a pattern but keep each `\x`
/// escape pair in order (`a\*c` -> `c\*a`).
pub fn reverse_pattern(pattern: &str) -> String {
    let runes: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; runes.len()];
    let last = runes.len() as isize - 1;
    let mut i: isize = 0;
    while i <= last {
        let tok = runes[i as usize];
        let out_idx = last - i;
        if tok == '\\' && i != last {
            out[(out_idx - 1) as usize] = tok;
            out[out_idx as usize] = runes[i as usize + 1];
            i += 2;
        } else {
            out[out_idx as usize] = tok;
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// Reverse by characters.
pub fn reverse_string(s: &str) -> String {
    s.chars().rev().collect()
}

fn trim_prefix(word: &str, value: &str, greedy: bool) -> Result<String, String> {
    let re = convert_shell_pattern_to_regex(word, greedy, true)
        .and_then(|r| compile(&r))
        .map_err(|e| format!("invalid pattern ({word}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

fn trim_suffix(pattern: &str, word: &str, greedy: bool) -> Result<String, String> {
    let pattern = reverse_pattern(pattern);
    let word = reverse_string(word);
    Ok(reverse_string(&trim_prefix(&pattern, &word, greedy)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_expansion() {
        let env = EnvList::from_slice(&["A=1", "B="]);
        let lex = Lex::new('\\');
        assert_eq!(lex.process_word("x${A}y$B", &env).unwrap().0, "x1y");
        assert_eq!(lex.process_words("a 'b c' d", &env).unwrap(), vec!["a", "b c", "d"]);
        assert!(lex.process_word("${A", &env).is_err());
        // BuildKit's shared word buffer: a nested expansion drops the partial word.
        assert_eq!(lex.process_words("a${X:-b}c", &env).unwrap(), vec!["bc"]);
    }
}

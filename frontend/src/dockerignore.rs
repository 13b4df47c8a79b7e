//! `.dockerignore` files with the semantics of moby's `patternmatcher`:
//! `*` and `?` within one path component, `**` across components, `!`
//! exceptions (the last matching pattern wins), a leading `/` ignored, and
//! patterns cleaned like Go's `filepath.Clean` (`.` and `..` resolved). A
//! path also matches when one of its parent directories matches.

/// Read the patterns of an ignore file (comments and blank lines dropped,
/// patterns trimmed and cleaned, `!` kept in front).
pub fn parse(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut p = line.trim();
        if p.is_empty() {
            continue;
        }
        let invert = p.starts_with('!');
        if invert {
            p = p[1..].trim();
        }
        let mut cleaned = String::new();
        if !p.is_empty() {
            cleaned = clean_path(p);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push(if invert { format!("!{cleaned}") } else { cleaned });
    }
    out
}

/// Go's `path.Clean`.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

struct Pattern {
    exclusion: bool,
    re: regex::Regex,
}

/// A compiled set of ignore patterns.
pub struct Matcher {
    patterns: Vec<Pattern>,
}

impl Matcher {
    /// Compile patterns as [`parse`] returns them.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Matcher, String> {
        let mut out = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            let (exclusion, body) = match p.strip_prefix('!') {
                Some(b) => (true, b),
                None => (false, p),
            };
            if body.is_empty() {
                return Err("illegal exclusion pattern: \"!\"".into());
            }
            let re = regex::Regex::new(&to_regex(&clean_path(body)))
                .map_err(|e| format!("invalid ignore pattern {p:?}: {e}"))?;
            out.push(Pattern { exclusion, re });
        }
        Ok(Matcher { patterns: out })
    }

    /// Whether `path` (relative to the context, `/`-separated) is ignored:
    /// the last pattern matching it or one of its parents decides.
    pub fn matches(&self, path: &str) -> bool {
        let file = clean_path(path.trim_start_matches('/'));
        let parent = match file.rfind('/') {
            Some(i) => &file[..i],
            None => ".",
        };
        let parent_dirs: Vec<&str> = parent.split('/').collect();
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.re.is_match(&file);
            if !m && parent != "." {
                for i in 0..parent_dirs.len() {
                    if p.re.is_match(&parent_dirs[..=i].join("/")) {
                        m = true;
                        break;
                    }
                }
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }
}

/// Translate one cleaned pattern into an anchored regular expression.
fn to_regex(pattern: &str) -> String {
    let mut re = String::from("^");
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    re.push_str(".*");
                } else {
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' | '^' => {
                re.push('\\');
                re.push(ch);
            }
            '\\' => {
                re.push('\\');
                match chars.get(i) {
                    Some(&n) => {
                        re.push(n);
                        i += 1;
                    }
                    None => re.push('\\'),
                }
            }
            '[' => {
                re.push('[');
                if chars.get(i) == Some(&'!') {
                    re.push('^');
                    i += 1;
                }
            }
            c => re.push(c),
        }
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_behave_like_moby() {
        let pats = parse("# comment\n*.log\n!keep.log\n/build/\n**/node_modules\ndocs/**/*.md\n./a/../tmp\n");
        assert_eq!(pats, ["*.log", "!keep.log", "build", "**/node_modules", "docs/**/*.md", "tmp"]);
        let m = Matcher::new(&pats).unwrap();
        assert!(m.matches("x.log"));
        assert!(!m.matches("keep.log"));
        assert!(!m.matches("sub/x.log"), "* does not cross /");
        assert!(m.matches("build/out/bin"), "parent dir matches");
        assert!(m.matches("a/b/node_modules/x"));
        assert!(m.matches("node_modules"));
        assert!(m.matches("docs/x.md") && m.matches("docs/a/b/x.md"));
        assert!(m.matches("tmp/file"));
        assert!(!m.matches("src/main.rs"));
        assert_eq!(clean_path("a/./b/../../c/"), "c");
        assert_eq!(clean_path("/../x"), "/x");
    }
}

//! Path patterns: `.dockerignore` / `COPY --exclude` matching and the
//! per-component globs of COPY sources.
//!
//! Semantics follow Docker's patternmatcher: patterns are cleaned paths
//! relative to the root, `*` and `?` never cross a `/`, `**` matches any
//! number of directories, `!pattern` re-includes, the last matching pattern
//! wins, and a pattern that matches a directory matches everything under it.
//!
//! Exclusion itself is the frontend's `.dockerignore` matcher; this module
//! adds what a walker needs (may an exception re-include something below
//! an excluded directory?) and the component globs of COPY sources.

use regex::Regex;

/// An ordered list of include/exclude patterns.
#[derive(Clone, Default)]
pub struct Matcher {
    /// The frontend's `.dockerignore` matcher decides what is excluded.
    rules: Option<std::sync::Arc<kiln_frontend::dockerignore::Matcher>>,
    /// The `!` patterns, cleaned, split into components.
    exceptions: Vec<Vec<String>>,
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher").field("exceptions", &self.exceptions).finish_non_exhaustive()
    }
}

impl Matcher {
    /// Compile `patterns` (`.dockerignore` lines, `!` for exceptions).
    pub fn new(patterns: &[String]) -> anyhow::Result<Matcher> {
        let mut kept = Vec::new();
        let mut exceptions = Vec::new();
        for raw in patterns {
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            if let Some(rest) = raw.strip_prefix('!') {
                let cleaned = clean(rest.trim());
                if !cleaned.is_empty() {
                    exceptions.push(cleaned.split('/').map(String::from).collect());
                }
            }
            kept.push(raw.to_string());
        }
        if kept.is_empty() {
            return Ok(Matcher::default());
        }
        // Normalized exactly as the frontend reads an ignore file.
        let kept = kiln_frontend::dockerignore::parse(&kept.join("\n"));
        let rules = kiln_frontend::dockerignore::Matcher::new(&kept).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Matcher { rules: Some(std::sync::Arc::new(rules)), exceptions })
    }

    /// Whether no pattern was given.
    pub fn is_empty(&self) -> bool {
        self.rules.is_none()
    }

    /// Whether a `!` exception exists (then excluded directories must still
    /// be walked, since something below may be re-included).
    pub fn has_exceptions(&self) -> bool {
        !self.exceptions.is_empty()
    }

    /// Whether an exception could re-include something below excluded
    /// directory `dir` (then the walk must enter it).
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        let dir: Vec<&str> = dir.split('/').collect();
        self.exceptions.iter().any(|pat| {
            if pat.first().is_some_and(|c| c == "**") {
                return true;
            }
            pat.len() > dir.len()
                && pat.iter().zip(&dir).all(|(p, d)| {
                    p == "**" || glob_to_regex(p, false).map(|re| re.is_match(d)).unwrap_or(false)
                })
        })
    }

    /// Whether `rel` (a clean `/`-separated path relative to the root) is
    /// excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        self.rules.as_ref().is_some_and(|r| r.matches(rel))
    }
}

/// Clean a pattern path: drop leading `/` and `./`, `.` components, fold
/// `..` (never above the root) and repeated slashes.
pub fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// Whether a path component contains glob metacharacters.
pub fn has_meta(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

/// Compile one glob (a whole path when `double_star`, else one component)
/// into an anchored regex.
pub fn glob_to_regex(glob: &str, double_star: bool) -> Result<Regex, regex::Error> {
    let mut re = String::from("^");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' if double_star && chars.get(i + 1) == Some(&'*') => {
                i += 1;
                if chars.get(i + 1) == Some(&'/') {
                    // `**/` matches zero or more directories.
                    i += 1;
                    re.push_str("(.*/)?");
                } else {
                    re.push_str(".*");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                let mut j = i + 1;
                let mut class = String::from("[");
                if chars.get(j) == Some(&'^') || chars.get(j) == Some(&'!') {
                    class.push('^');
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    if chars[j] == '\\' || chars[j] == '[' {
                        class.push('\\');
                    }
                    class.push(chars[j]);
                    j += 1;
                }
                if j == chars.len() {
                    return Err(regex::Error::Syntax(format!("unterminated [ in {glob:?}")));
                }
                class.push(']');
                re.push_str(&class);
                i = j;
            }
            '\\' if i + 1 < chars.len() => {
                i += 1;
                re.push_str(&regex::escape(&chars[i].to_string()));
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    re.push('$');
    Regex::new(&re)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &[&str]) -> Matcher {
        Matcher::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn dockerignore_rules() {
        let matcher = m(&["*.log", "!keep.log", "build/", "**/tmp", "/secret?.txt", "# comment"]);
        assert!(matcher.excluded("a.log"));
        assert!(!matcher.excluded("keep.log"));
        assert!(!matcher.excluded("dir/a.log"), "* does not cross /");
        assert!(matcher.excluded("build/x/y.c"), "dir pattern excludes contents");
        assert!(matcher.excluded("a/b/tmp/z"));
        assert!(matcher.excluded("tmp"));
        assert!(matcher.excluded("secret1.txt"));
        assert!(!matcher.excluded("secret12.txt"));
        assert!(!matcher.excluded("src/main.rs"));
        assert!(matcher.has_exceptions());
        let matcher = m(&["docs", "!docs/keep/*.md", "vendor", "!**/LICENSE"]);
        assert!(matcher.may_reinclude_below("docs") && matcher.may_reinclude_below("docs/keep"));
        assert!(matcher.may_reinclude_below("vendor"), "** may match anywhere");
        let matcher = m(&["docs", "!docs/keep/*.md"]);
        assert!(!matcher.may_reinclude_below("docs/other"));
    }

    #[test]
    fn last_match_wins() {
        let matcher = m(&["docs", "!docs/README.md", "docs/README.md"]);
        assert!(matcher.excluded("docs/README.md"));
        let matcher = m(&["*", "!src"]);
        assert!(!matcher.excluded("src/a.c"));
        assert!(matcher.excluded("Dockerfile"));
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean("/a//b/./c/../d/"), "a/b/d");
        assert_eq!(clean("../../x"), "x");
        assert_eq!(clean("."), "");
    }

    #[test]
    fn component_globs() {
        let re = glob_to_regex("*.t[xy]t", false).unwrap();
        assert!(re.is_match("a.txt") && re.is_match("b.tyt") && !re.is_match("a.tzt"));
        assert!(glob_to_regex("[abc", false).is_err());
    }
}

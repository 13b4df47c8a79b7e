//! The one error type of the frontend: a message, where it happened, and the
//! offending source line.

use crate::parser::Span;

/// An error from parsing, typing or lowering a Dockerfile.
///
/// Displays like BuildKit, e.g.
/// `Dockerfile:3:1: unknown instruction: RNU (did you mean RUN?)` followed by
/// the offending line on the next line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendError {
    /// The message alone (what BuildKit's error text is), e.g.
    /// `unknown instruction: RNU (did you mean RUN?)`.
    pub message: String,
    /// Where, when known.
    pub span: Option<Span>,
    /// File name shown in front of the position (`Dockerfile` by default).
    pub file: String,
    /// The first source line of `span`, when the source was available.
    pub line_text: Option<String>,
}

impl FrontendError {
    /// An error without position.
    pub fn new(message: impl Into<String>) -> Self {
        FrontendError { message: message.into(), span: None, file: "Dockerfile".into(), line_text: None }
    }

    /// An error at `span`.
    pub fn at(message: impl Into<String>, span: Span) -> Self {
        let mut e = FrontendError::new(message);
        e.span = Some(span);
        e
    }

    /// Attach the position if none is set yet.
    pub fn or_at(mut self, span: Span) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self
    }

    /// Fill in the offending line from the Dockerfile text (if a span is set
    /// and the line exists).
    pub fn with_source(mut self, source: &str) -> Self {
        if self.line_text.is_none()
            && let Some(span) = self.span
            && span.start_line > 0
        {
            let source = source.strip_prefix('\u{feff}').unwrap_or(source);
            self.line_text = source
                .split('\n')
                .nth(span.start_line - 1)
                .map(|l| l.trim_end_matches(['\r', '\n']).to_string());
        }
        self
    }

    /// Use another file name in the message (e.g. `app.Dockerfile`).
    pub fn in_file(mut self, file: impl Into<String>) -> Self {
        self.file = file.into();
        self
    }
}

impl std::fmt::Display for FrontendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.span {
            Some(s) if s.start_line > 0 => {
                write!(f, "{}:{}:{}: {}", self.file, s.start_line, s.start_col.max(1), self.message)?
            }
            _ => write!(f, "{}: {}", self.file, self.message)?,
        }
        if let (Some(line), Some(s)) = (&self.line_text, self.span) {
            write!(f, "\n >>> {:>4} | {}", s.start_line, line)?;
        }
        Ok(())
    }
}

impl std::error::Error for FrontendError {}

/// The closest candidate to `word` (case-insensitive Levenshtein distance at
/// most 2), for "did you mean" hints.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = levenshtein(&w, &c.to_ascii_lowercase());
        if d <= 2 && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Edit distance counting a swap of neighbours as one edit (so `RNU` is
/// closer to `RUN` than to `ENV`).
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_position_and_line() {
        let span = Span { start_line: 2, start_col: 1, end_line: 2, end_col: 8 };
        let e = FrontendError::at("unknown instruction: RNU (did you mean RUN?)", span)
            .with_source("FROM x\nRNU make\n");
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:1: unknown instruction: RNU (did you mean RUN?)\n >>>    2 | RNU make"
        );
        assert_eq!(suggest("RNU", ["FROM", "RUN", "CMD"]), Some("RUN"));
        assert_eq!(suggest("XYZZY", ["FROM", "RUN"]), None);
    }
}

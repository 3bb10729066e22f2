//! Diagnostics for scripts and config: a message, where it happened, the
//! source line, and the chain of imports or calls that led there.
//!
//! A [`Diagnostic`] is plain data so that it can be stored (reload status),
//! sent (API) and rendered (terminal, through miette's graphical handler).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A place in a file: canonical path, 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Location {
    pub file: Arc<str>,
    pub line: usize,
    pub column: usize,
}

/// Where in a script a value was constructed; used to point diagnostics at it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// Canonical path of the script file (or `<stdlib>/name.rhai`).
    pub file: Arc<str>,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

impl From<&Origin> for Location {
    fn from(o: &Origin) -> Self {
        Location {
            file: o.file.clone(),
            line: o.line as usize,
            column: o.column as usize,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            display_path(&self.file),
            self.line,
            self.column
        )
    }
}

/// One hop on the way to an error: "imported here", "called here".
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceFrame {
    pub label: String,
    pub location: Location,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub location: Option<Location>,
    /// Text to underline at or after `location` (a key name, say).
    #[serde(skip)]
    pub focus: Option<String>,
    pub help: Option<String>,
    /// Outermost last: the innermost import or call first.
    pub trace: Vec<TraceFrame>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            location: None,
            focus: None,
            help: None,
            trace: Vec::new(),
        }
    }
    pub fn warning(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(message)
        }
    }
    pub fn at(mut self, location: Option<Location>) -> Self {
        self.location = location;
        self
    }
    pub fn at_origin(self, origin: Option<&Origin>) -> Self {
        self.at(origin.map(Location::from))
    }
    pub fn with_help(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }
    pub fn with_focus(mut self, focus: Option<String>) -> Self {
        self.focus = focus;
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// One line: `file:line:col: message` (for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.location {
            write!(f, "{l}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.help {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

/// The text of every file a load read, by canonical path, for rendering.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    files: HashMap<Arc<str>, Arc<str>>,
}

impl Sources {
    pub fn insert(&mut self, file: Arc<str>, text: Arc<str>) {
        self.files.insert(file, text);
    }
    pub fn get(&self, file: &str) -> Option<&Arc<str>> {
        self.files.get(file)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.files.iter()
    }
}

/// A path as the user should see it: relative to the current directory when
/// it lies below it, as given otherwise.
pub fn display_path(file: &str) -> String {
    let p = Path::new(file);
    if let Ok(cwd) = std::env::current_dir() {
        if let Ok(rel) = p.strip_prefix(&cwd) {
            return rel.display().to_string();
        }
    }
    file.to_string()
}

pub fn display_pathbuf(p: &Path) -> String {
    display_path(&p.to_string_lossy())
}

/// Renders diagnostics for a terminal; `color` selects ANSI styling.
pub fn render(diags: &[Diagnostic], sources: &Sources, color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    for d in diags {
        let report = Report::build(d, sources);
        if handler.render_report(&mut out, &report).is_err() {
            // Rendering into a String cannot fail in practice; keep the plain form.
            out.push_str(&d.to_string());
            out.push('\n');
        }
    }
    out
}

/// miette's view of a [`Diagnostic`].
#[derive(Debug)]
struct Report {
    message: String,
    severity: miette::Severity,
    src: Option<NamedSource<String>>,
    labels: Vec<LabeledSpan>,
    help: Option<String>,
    related: Vec<Report>,
}

impl Report {
    fn build(d: &Diagnostic, sources: &Sources) -> Report {
        let severity = match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        };
        let mut message = d.message.clone();
        let (src, labels) = match &d.location {
            Some(loc) => match snippet(loc, d.focus.as_deref(), sources, "here") {
                Some((src, label)) => (Some(src), vec![label]),
                None => {
                    message = format!("{loc}: {message}");
                    (None, vec![])
                }
            },
            None => (None, vec![]),
        };
        let related = d
            .trace
            .iter()
            .map(|frame| {
                let (src, labels, msg) = match snippet(&frame.location, None, sources, &frame.label)
                {
                    Some((src, label)) => (Some(src), vec![label], frame.label.clone()),
                    None => (None, vec![], format!("{}: {}", frame.location, frame.label)),
                };
                Report {
                    message: msg,
                    severity: miette::Severity::Advice,
                    src,
                    labels,
                    help: None,
                    related: vec![],
                }
            })
            .collect();
        Report {
            message,
            severity,
            src,
            labels,
            help: d.help.clone(),
            related,
        }
    }
}

/// The named source and the labelled span for a location, when its text is known.
fn snippet(
    loc: &Location,
    focus: Option<&str>,
    sources: &Sources,
    label: &str,
) -> Option<(NamedSource<String>, LabeledSpan)> {
    let text = sources.get(&loc.file)?;
    let start = offset_of(text, loc.line, loc.column)?;
    let (start, len) = match focus.and_then(|f| find_focus(text, start, f)) {
        Some(at) => (at, focus.map_or(1, str::len)),
        None => (start, token_len(&text[start..])),
    };
    let src = NamedSource::new(display_path(&loc.file), text.to_string()).with_language("rust");
    let span = SourceSpan::new(start.into(), len);
    Some((
        src,
        LabeledSpan::new_with_span(Some(label.to_string()), span),
    ))
}

/// Byte offset of a 1-based (line, column in characters).
fn offset_of(text: &str, line: usize, column: usize) -> Option<usize> {
    let mut off = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col = column.max(1) - 1;
            let within = l
                .char_indices()
                .nth(col)
                .map_or(l.trim_end_matches('\n').len(), |(b, _)| b);
            return Some(off + within);
        }
        off += l.len();
    }
    if line == 0 {
        return Some(0);
    }
    None
}

/// Finds `focus` as a whole word (a map key) within the next few lines.
fn find_focus(text: &str, from: usize, focus: &str) -> Option<usize> {
    let window_end = text[from..]
        .char_indices()
        .filter(|(_, c)| *c == '\n')
        .nth(40)
        .map_or(text.len(), |(i, _)| from + i);
    find_word(&text[from..window_end], focus).map(|at| from + at)
}

/// Byte offset of `word` standing alone (not inside a longer name) in `hay`.
pub fn find_word(hay: &str, word: &str) -> Option<usize> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(i) = hay[from..].find(word) {
        let at = from + i;
        let before = hay[..at].chars().next_back();
        let after = hay[at + word.len()..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// Length of the token starting the text: a string literal, an identifier,
/// or one character.
fn token_len(text: &str) -> usize {
    if let Some(rest) = text.strip_prefix('"') {
        if let Some(end) = rest.find(['"', '\n']) {
            return end + 2;
        }
    }
    let n: usize = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .map(char::len_utf8)
        .sum();
    if n > 0 {
        n
    } else {
        text.chars()
            .next()
            .map_or(0, |c| if c == '\n' { 0 } else { c.len_utf8() })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.src.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            None
        } else {
            Some(Box::new(self.labels.iter().cloned()))
        }
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            None
        } else {
            Some(Box::new(
                self.related.iter().map(|r| r as &dyn miette::Diagnostic),
            ))
        }
    }
}

/// A canonical path for recording and lookups; falls back to the path given.
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `url` with the password of its user part replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

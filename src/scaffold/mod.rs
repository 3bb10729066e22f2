//! Writing new master dirs: `kiln create-master` and `kiln quickstart`.
//!
//! A master dir is a master script made from a template, with its
//! `@NAME@` placeholders filled (a value is written as a Rhai literal, so
//! a path with quotes in it stays a path), and its generated secrets in
//! `secrets/`, readable by the owner only.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};

/// `kiln create-master`: one Mercurial repository polled, one scheduler,
/// one builder, one worker (`examples/quickstart` is its output for
/// `--repo repo`). Placeholder: `@REPO@`.
pub const HG_MASTER: &str = include_str!("hg-master.rhai");

/// `kiln quickstart`: a local Git repository, two builders, two local
/// workers. Placeholders: `@REPO@`, `@HTTP@`, `@WORKERS@`.
pub const GIT_DEMO: &str = include_str!("git-demo.rhai");

/// A value for a template's placeholder.
pub enum Fill<'a> {
    /// Written as a Rhai string literal.
    Str(&'a str),
    /// Written as it is (a number).
    Int(u64),
}

/// Fills every `@NAME@` of `template`; a placeholder left without a value,
/// or a value for none, is a fault of kiln's, reported as such.
pub fn render(template: &str, values: &[(&str, Fill<'_>)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (name, value) in values {
        let key = format!("@{name}@");
        if !out.contains(&key) {
            bail!("the template has no {key}");
        }
        let text = match value {
            Fill::Str(s) => rhai_string(s),
            Fill::Int(n) => n.to_string(),
        };
        out = out.replace(&key, &text);
    }
    if let Some(left) = leftover(&out) {
        bail!("the template's {left} has no value");
    }
    Ok(out)
}

/// The first `@NAME@` (upper-case name) left in `text`.
fn leftover(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(i) = rest.find('@') {
        let after = &rest[i + 1..];
        if let Some(j) = after.find('@') {
            let name = &after[..j];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                return Some(&rest[i..i + j + 2]);
            }
        }
        rest = after;
    }
    None
}

/// `s` as a Rhai string literal.
pub fn rhai_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `dir/master.rhai`, refusing to replace one that exists.
pub fn write_master(dir: &Path, script: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let entry = dir.join(crate::script::ENTRY_SCRIPT);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&entry)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!("{} already exists; not overwriting it", entry.display())
            }
            _ => anyhow::anyhow!("cannot write {}: {e}", entry.display()),
        })?;
    f.write_all(script.as_bytes())
        .with_context(|| format!("cannot write {}", entry.display()))
}

/// A new secret: 128 bits from the operating system's cryptographic
/// random source, as 32 hex digits.
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot read the system's random source: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `dir/secrets/NAME` (what `secret("NAME")` reads), created
/// readable and writable by the owner only: the value never sits in a
/// file others can read, not even for a moment.
pub fn write_secret(dir: &Path, name: &str, value: &str) -> anyhow::Result<()> {
    let secrets = dir.join(crate::script::SECRETS_DIR);
    std::fs::create_dir_all(&secrets)
        .with_context(|| format!("cannot create {}", secrets.display()))?;
    let path = secrets.join(name);
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let mut f = open
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{value}").with_context(|| format!("cannot write {}", path.display()))
}

/// `kiln create-master DIR --repo REPO`: the Mercurial master and a
/// generated worker password.
pub fn create_master(dir: &Path, repo: &str) -> anyhow::Result<()> {
    let script = render(HG_MASTER, &[("REPO", Fill::Str(repo))])?;
    write_master(dir, &script)?;
    write_secret(dir, "worker-password", &random_token()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_master_writes_the_quickstart_example_and_an_owner_only_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_master(dir.path(), "repo").expect("create");
        let written = std::fs::read_to_string(dir.path().join("master.rhai")).expect("read");
        assert_eq!(
            written,
            include_str!("../../examples/quickstart/master.rhai"),
            "examples/quickstart is create-master's output; regenerate one with the other"
        );
        let secret = dir.path().join("secrets/worker-password");
        let token = std::fs::read_to_string(&secret).expect("secret");
        assert_eq!(token.trim().len(), 32);
        assert!(token.trim().chars().all(|c| c.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret)
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = create_master(dir.path(), "other").expect_err("second create");
        assert!(again.to_string().contains("already exists"), "{again}");
    }

    #[test]
    fn a_value_is_written_as_a_rhai_literal_and_a_placeholder_is_never_left() {
        let t = "let repo = @REPO@; let port = @PORT@;";
        let out = render(
            t,
            &[
                ("REPO", Fill::Str("a \"b\"\\c\n")),
                ("PORT", Fill::Int(8010)),
            ],
        )
        .expect("render");
        assert_eq!(out, r#"let repo = "a \"b\"\\c\n"; let port = 8010;"#);
        let e = render(t, &[("REPO", Fill::Str("r"))]).expect_err("PORT unfilled");
        assert!(e.to_string().contains("@PORT@"), "{e}");
        let e = render(t, &[("NOPE", Fill::Int(1))]).expect_err("no such placeholder");
        assert!(e.to_string().contains("@NOPE@"), "{e}");
        // An e-mail address in a template is not a placeholder.
        assert!(render("// mail a@b.c", &[]).is_ok());
    }

    #[test]
    fn tokens_differ_each_time() {
        let a = random_token().expect("token");
        let b = random_token().expect("token");
        assert_ne!(a, b);
    }

    #[test]
    fn every_template_loads_once_filled() {
        for (name, script) in [
            (
                "hg",
                render(HG_MASTER, &[("REPO", Fill::Str("repo"))]).expect("hg"),
            ),
            (
                "git",
                render(
                    GIT_DEMO,
                    &[
                        ("REPO", Fill::Str("/tmp/repo")),
                        ("HTTP", Fill::Int(8010)),
                        ("WORKERS", Fill::Int(9989)),
                    ],
                )
                .expect("git"),
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            write_master(dir.path(), &script).expect("write");
            write_secret(dir.path(), "worker-password", "pw").expect("secret");
            if let Err(f) = crate::script::load_master(dir.path(), crate::script::Limits::default())
            {
                panic!(
                    "the {name} template does not load:\n{}",
                    crate::diagnostics::render(&f.diagnostics, &f.sources, false)
                );
            }
        }
    }
}

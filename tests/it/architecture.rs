//! The dependency table of ARCHITECTURE.md, checked against the code: each
//! top-level module of `src/` names (`crate::x`) only the modules the table
//! allows it, so that a dependency pointing the wrong way fails here
//! rather than in a review. (The crates' boundaries the compiler keeps.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::repo_root;

/// Who may use whom, as ARCHITECTURE.md's table says (`sync` aside).
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("suggest", &[][..]),
        ("sync", &[]),
        ("throttle", &["sync"]),
        ("net", &["config", "sync"]),
        ("memory", &[]),
        ("queuedir", &[]),
        ("events", &[]),
        ("diagnostics", &[]),
        ("config", &["diagnostics", "suggest"]),
        (
            "script",
            &["config", "diagnostics", "memory", "suggest", "sync"],
        ),
        ("store", &["events", "diagnostics", "sync"]),
        ("changes", &["config", "store", "sync"]),
        (
            "workers",
            &["config", "events", "net", "store", "sync", "throttle"],
        ),
        (
            "schedulers",
            &["changes", "config", "script", "store", "sync"],
        ),
        (
            "builds",
            &[
                "config",
                "script",
                "store",
                "schedulers",
                "workers",
                "queuedir",
                "sync",
            ],
        ),
        (
            "http",
            &[
                "builds",
                "changes",
                "config",
                "events",
                "net",
                "schedulers",
                "store",
                "sync",
                "throttle",
            ],
        ),
        (
            "master",
            &[
                "builds",
                "changes",
                "config",
                "diagnostics",
                "http",
                "net",
                "queuedir",
                "schedulers",
                "script",
                "store",
                "sync",
                "workers",
            ],
        ),
        ("client", &["master", "store"]),
        (
            "repl",
            &[
                "client",
                "config",
                "diagnostics",
                "memory",
                "schedulers",
                "script",
                "store",
                "sync",
            ],
        ),
        ("scaffold", &["script", "diagnostics"]),
        (
            "quickstart",
            &["scaffold", "master", "script", "diagnostics"],
        ),
        ("bench", &["changes", "schedulers", "script", "store"]),
    ])
}

/// Every `crate::x` a file names outside comments.
fn uses(path: &Path, into: &mut BTreeSet<String>) {
    let text = std::fs::read_to_string(path).expect("read");
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                into.insert(name);
            }
            rest = after;
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_uses_only_what_the_dependency_table_allows() {
    let src = repo_root().join("src");
    let allowed = allowed();
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for e in std::fs::read_dir(&src).expect("src").flatten() {
        let p = e.path();
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if ["lib", "main", "cli"].contains(&name.as_str()) {
            continue; // the crate root and the dispatcher may use anything
        }
        let mut files = Vec::new();
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p.clone());
        } else {
            continue;
        }
        let Some(may) = allowed.get(name.as_str()) else {
            wrong.push(format!("src/{name} is not in the table"));
            continue;
        };
        seen.insert(name.clone());
        let mut used = BTreeSet::new();
        for f in &files {
            uses(f, &mut used);
        }
        // `sync` (locks that ignore poisoning) is for everyone.
        for u in used.iter().filter(|u| **u != name && u.as_str() != "sync") {
            if !may.contains(&u.as_str()) {
                wrong.push(format!("{name} uses {u}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies the table in ARCHITECTURE.md does not allow:\n{}",
        wrong.join("\n")
    );
    let missing: Vec<_> = allowed.keys().filter(|k| !seen.contains(**k)).collect();
    assert!(
        missing.is_empty(),
        "the table names modules that do not exist: {missing:?}"
    );
}

#[test]
fn a_wrong_way_dependency_is_caught() {
    // The scanner itself: a use in code counts, one in a comment does not.
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("x.rs");
    std::fs::write(
        &f,
        "use crate::store::Store; // crate::http is only mentioned\nfn f() { crate::sync::lock(&m); }\n",
    )
    .expect("write");
    let mut used = BTreeSet::new();
    uses(&f, &mut used);
    assert_eq!(
        used,
        BTreeSet::from(["store".to_string(), "sync".to_string()])
    );
    assert!(
        !allowed()["config"].contains(&"store"),
        "config may not use store"
    );
}

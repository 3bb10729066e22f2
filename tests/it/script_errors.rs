//! Every bad master in tests/scripts/errors/ must make `kiln checkconfig`
//! exit 1 with the diagnostic in its `expected.txt`: file:line:col, the
//! source line with a marker, and the import chain. None may panic or hang.

use crate::common;

use std::time::Duration;

#[test]
fn bad_scripts_give_their_expected_diagnostics() {
    let dir = common::repo_root().join("tests/scripts/errors");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("read cases")
        .map(|e| e.expect("entry").path())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 15,
        "expected the full set of error fixtures, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let extra = std::fs::read_to_string(case.join("args")).unwrap_or_default();
        let mut args = vec!["checkconfig", "."];
        args.extend(extra.split_whitespace());
        let out = common::kiln(case, &args, Duration::from_secs(120));
        let name = case
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if out.code != Some(1) {
            failures.push(format!(
                "{name}: exit {:?}, expected 1\n{}",
                out.code, out.stderr
            ));
            continue;
        }
        if out.stderr.contains("panicked") {
            failures.push(format!("{name}: panicked\n{}", out.stderr));
            continue;
        }
        if let Err(e) = std::panic::catch_unwind(|| {
            common::expect_file(&case.join("expected.txt"), &out.stderr)
        }) {
            failures.push(format!(
                "{name}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

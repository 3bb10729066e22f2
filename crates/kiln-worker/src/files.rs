//! The file commands: mkdir, rmdir, rmfile, stat, glob, listdir, cpdir.

use std::path::{Path, PathBuf};

use rmpv::Value;

use kiln_protocol::{map_get, str_of};

use super::session::{arg_str, CommandCtx};

/// The file commands; an error is why one could not run. Results go in
/// updates (`rc`, and `stat`/`files` where the command answers something).
pub(super) async fn file_command(ctx: &CommandCtx, name: &str, args: &Value) -> Result<(), String> {
    let path = arg_str(args, "path").map(PathBuf::from);
    let fail = |e: std::io::Error| {
        ctx.header(&format!("{name} failed: {e}"));
        ctx.update(vec![("rc", Value::from(e.raw_os_error().unwrap_or(1)))]);
        Ok(())
    };
    let ok = |extra: Vec<(&str, Value)>| {
        let mut pairs = extra;
        pairs.push(("rc", Value::from(0)));
        ctx.update(pairs);
        Ok(())
    };
    match name {
        "mkdir" => match path.map(std::fs::create_dir_all) {
            Some(Ok(())) => ok(vec![]),
            Some(Err(e)) => fail(e),
            None => Err("mkdir needs a path".into()),
        },
        "rmdir" => {
            let paths: Vec<PathBuf> = match map_get(args, "paths").or_else(|| map_get(args, "path"))
            {
                Some(Value::Array(a)) => a.iter().filter_map(str_of).map(PathBuf::from).collect(),
                Some(v) => str_of(v).map(PathBuf::from).into_iter().collect(),
                None => return Err("rmdir needs paths".into()),
            };
            for p in paths {
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else if p.exists() {
                    std::fs::remove_file(&p)
                } else {
                    Ok(())
                };
                if let Err(e) = r {
                    return fail(e);
                }
            }
            ok(vec![])
        }
        "rmfile" => match path.map(std::fs::remove_file) {
            Some(Ok(())) => ok(vec![]),
            Some(Err(e)) => fail(e),
            None => Err("rmfile needs a path".into()),
        },
        "stat" => match path.map(std::fs::metadata) {
            Some(Ok(m)) => {
                use std::os::unix::fs::MetadataExt;
                let st = Value::Array(vec![
                    Value::from(m.mode() as u64),
                    Value::from(m.ino()),
                    Value::from(m.dev()),
                    Value::from(m.nlink()),
                    Value::from(m.uid() as u64),
                    Value::from(m.gid() as u64),
                    Value::from(m.size()),
                    Value::from(m.atime()),
                    Value::from(m.mtime()),
                    Value::from(m.ctime()),
                ]);
                ok(vec![("stat", st)])
            }
            Some(Err(e)) => fail(e),
            None => Err("stat needs a path".into()),
        },
        "listdir" => match path.map(std::fs::read_dir) {
            Some(Ok(entries)) => {
                let mut names: Vec<String> = entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect();
                names.sort();
                ok(vec![(
                    "files",
                    Value::Array(names.into_iter().map(Value::from).collect()),
                )])
            }
            Some(Err(e)) => fail(e),
            None => Err("listdir needs a path".into()),
        },
        "glob" => {
            let Some(pattern) = path else {
                return Err("glob needs a path".into());
            };
            let files = glob_paths(&pattern);
            ok(vec![(
                "files",
                Value::Array(files.into_iter().map(Value::from).collect()),
            )])
        }
        "cpdir" => {
            let (Some(from), Some(to)) = (arg_str(args, "from_path"), arg_str(args, "to_path"))
            else {
                return Err("cpdir needs from_path and to_path".into());
            };
            match copy_dir(Path::new(&from), Path::new(&to)) {
                Ok(()) => ok(vec![]),
                Err(e) => fail(e),
            }
        }
        other => Err(format!("command {other} is not supported by kiln's worker")),
    }
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// `*` and `?` in the last component of a path.
pub(super) fn glob_paths(pattern: &Path) -> Vec<String> {
    let (Some(dir), Some(pat)) = (
        pattern.parent(),
        pattern.file_name().and_then(|f| f.to_str()),
    ) else {
        return vec![];
    };
    pub(super) fn matches(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => matches(&p[1..], s) || (!s.is_empty() && matches(p, &s[1..])),
            (Some(b'?'), Some(_)) => matches(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| matches(pat.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

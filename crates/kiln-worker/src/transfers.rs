//! File transfers: `upload_file`, `upload_directory` (a tar, optionally gz
//! or bz2) and `download_file`, block by block, each block an answered call
//! to the master.

use std::path::Path;

use rmpv::Value;
use tokio::sync::mpsc;

use kiln_protocol::map_get;

use super::session::{arg_str, CommandCtx};

/// The end of a transfer: `rc`, and `stderr` when something went wrong
/// (as Buildbot's transfer commands report it).
pub(super) fn transfer_result(ctx: &CommandCtx, stderr: Option<String>) -> Result<(), String> {
    let mut pairs = vec![("rc", Value::from(i64::from(stderr.is_some())))];
    if let Some(e) = stderr {
        pairs.push(("stderr", Value::from(format!("{e}\n"))));
    }
    ctx.update(pairs);
    Ok(())
}

pub(super) fn transfer_sizes(args: &Value) -> (Option<u64>, usize) {
    let maxsize = map_get(args, "maxsize").and_then(Value::as_u64);
    let blocksize = map_get(args, "blocksize")
        .and_then(Value::as_u64)
        .unwrap_or(16 * 1024)
        .clamp(1, 16 << 20) as usize;
    (maxsize, blocksize)
}

/// A tarball of `dir` in a temporary file, compressed as asked.
pub(super) fn tar_directory(dir: &Path, compress: Option<&str>) -> std::io::Result<std::fs::File> {
    let mut file = tempfile::tempfile()?;
    {
        let w: Box<dyn std::io::Write> = match compress {
            Some("gz") => Box::new(flate2::write::GzEncoder::new(
                &mut file,
                flate2::Compression::default(),
            )),
            Some("bz2") => Box::new(bzip2::write::BzEncoder::new(
                &mut file,
                bzip2::Compression::default(),
            )),
            _ => Box::new(&mut file),
        };
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        b.append_dir_all(".", dir)?;
        b.into_inner()?.flush()?;
    }
    use std::io::Seek;
    file.rewind()?;
    Ok(file)
}

/// `upload_file` / `upload_directory`: the file (or a tar of the
/// directory) to the master in `blocksize` blocks, then close (and utime
/// with `keepstamp`) or unpack.
pub(super) async fn upload(
    ctx: &CommandCtx,
    args: &Value,
    directory: bool,
    mut interrupt: mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    use std::io::Read;
    let Some(path) = arg_str(args, "path") else {
        return Err("an upload needs a path".into());
    };
    let (maxsize, blocksize) = transfer_sizes(args);
    let keepstamp = map_get(args, "keepstamp")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let opened = if directory {
        let compress = arg_str(args, "compress");
        tar_directory(Path::new(&path), compress.as_deref())
            .map_err(|e| format!("Cannot read directory '{path}' for upload: {e}"))
    } else {
        std::fs::File::open(&path).map_err(|_| format!("Cannot open file '{path}' for upload"))
    };
    let write_op = if directory {
        "update_upload_directory_write"
    } else {
        "update_upload_file_write"
    };
    let mut stderr = None;
    if let (true, Err(e)) = (directory, &opened) {
        // Buildbot's worker reports an unreadable directory without calling
        // the master back.
        return transfer_result(ctx, Some(e.clone()));
    }
    ctx.header(&format!("sending {path}"));
    let mut failed_call = None;
    if let Ok(mut file) = opened {
        let mut remaining = maxsize;
        let mut buf = vec![0u8; blocksize];
        loop {
            if let Ok(why) = interrupt.try_recv() {
                stderr = Some(format!("upload interrupted: {why}"));
                break;
            }
            let want = remaining.map_or(blocksize, |r| (r as usize).min(blocksize));
            if want == 0 {
                // At the limit: anything more is truncated.
                let mut probe = [0u8; 1];
                if matches!(file.read(&mut probe), Ok(n) if n > 0) {
                    stderr = Some(format!(
                        "Maximum filesize reached, truncating file '{path}'"
                    ));
                }
                break;
            }
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    stderr = Some(format!("cannot read '{path}': {e}"));
                    break;
                }
            };
            remaining = remaining.map(|r| r - n as u64);
            if let Err(e) = ctx
                .call(write_op, vec![("args", Value::Binary(buf[..n].to_vec()))])
                .await
            {
                failed_call = Some(e);
                break;
            }
        }
    } else if let Err(e) = opened {
        stderr = Some(e);
    }
    if directory {
        if failed_call.is_none() && stderr.is_none() {
            if let Err(e) = ctx.call("update_upload_directory_unpack", vec![]).await {
                failed_call = Some(e);
            }
        }
    } else {
        let closed = ctx.call("update_upload_file_close", vec![]).await;
        if failed_call.is_none() {
            failed_call = closed.err();
        }
        if keepstamp && failed_call.is_none() && stderr.is_none() {
            if let Ok(m) = std::fs::metadata(&path) {
                use std::os::unix::fs::MetadataExt;
                let at = m.atime() as f64 + m.atime_nsec() as f64 / 1e9;
                let mt = m.mtime() as f64 + m.mtime_nsec() as f64 / 1e9;
                failed_call = ctx
                    .call(
                        "update_upload_file_utime",
                        vec![
                            ("access_time", Value::F64(at)),
                            ("modified_time", Value::F64(mt)),
                        ],
                    )
                    .await
                    .err();
            }
        }
    }
    transfer_result(ctx, failed_call.or(stderr))
}

/// `download_file`: asks the master for `blocksize` blocks until an empty
/// one, writing them to `path` (its directory created, `mode` applied).
pub(super) async fn download(
    ctx: &CommandCtx,
    args: &Value,
    mut interrupt: mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    use std::io::Write;
    let Some(path) = arg_str(args, "path") else {
        return Err("a download needs a path".into());
    };
    let (maxsize, blocksize) = transfer_sizes(args);
    let mode = map_get(args, "mode").and_then(Value::as_u64);
    let opened = (|| {
        if let Some(dir) = Path::new(&path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::File::create(&path)?;
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode as u32))?;
        }
        Ok::<_, std::io::Error>(f)
    })();
    let mut stderr = None;
    match opened {
        Err(_) => stderr = Some(format!("Cannot open file '{path}' for download")),
        Ok(mut file) => {
            let mut remaining = maxsize;
            loop {
                if let Ok(why) = interrupt.try_recv() {
                    stderr = Some(format!("download interrupted: {why}"));
                    break;
                }
                let want = remaining.map_or(blocksize as u64, |r| r.min(blocksize as u64));
                if want == 0 {
                    stderr = Some(format!(
                        "Maximum filesize reached, truncating file '{path}'"
                    ));
                    break;
                }
                let data = match ctx
                    .call("update_read_file", vec![("length", Value::from(want))])
                    .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        stderr = Some(e);
                        break;
                    }
                };
                let bytes: &[u8] = match &data {
                    Value::Binary(b) => b,
                    Value::String(s) => s.as_bytes(),
                    _ => &[],
                };
                if bytes.is_empty() {
                    break;
                }
                let n = (bytes.len() as u64).min(want) as usize;
                if let Err(e) = file.write_all(&bytes[..n]) {
                    stderr = Some(format!("cannot write '{path}': {e}"));
                    break;
                }
                remaining = remaining.map(|r| r - n as u64);
            }
        }
    }
    let closed = ctx.call("update_read_file_close", vec![]).await;
    if stderr.is_none() {
        stderr = closed.err();
    }
    transfer_result(ctx, stderr)
}

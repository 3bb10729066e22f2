//! The master's end of file transfers (Buildbot's `FileWriter` and
//! `FileReader`): while an `upload_file`, `upload_directory` or
//! `download_file` command runs, the worker calls back with
//! `update_upload_file_write`, `update_read_file` and the like, naming the
//! command; its [`Transfer`] answers.
//!
//! An upload is written to a temporary file beside its destination and
//! moved into place only when the command has succeeded
//! ([`Upload::finish`]), so a failed or interrupted upload never leaves a
//! half-written file where the real one belongs; a transfer dropped
//! unfinished (the worker went away) removes its temporary file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rmpv::Value;

use super::protocol::map_get;

/// What an upload delivers.
#[derive(Debug)]
pub enum UploadKind {
    /// One file, with these permission bits if given.
    File { mode: Option<u32> },
    /// A tarball, unpacked into the destination directory.
    Directory { compress: Option<String> },
}

/// A file or directory coming from the worker.
#[derive(Debug)]
pub struct Upload {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    written: u64,
    maxsize: Option<u64>,
    kind: UploadKind,
    /// (access, modified) times from `update_upload_file_utime`.
    times: Option<(f64, f64)>,
    /// A directory upload that was unpacked.
    unpacked: bool,
    done: bool,
}

/// A file going to the worker.
pub struct Download {
    source: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Download")
    }
}

/// The master's side of one running transfer command.
#[derive(Debug)]
pub enum Transfer {
    Upload(Upload),
    Download(Download),
}

impl Upload {
    /// Prepares to receive into `dest` (its directory is created).
    pub fn new(dest: PathBuf, maxsize: Option<u64>, kind: UploadKind) -> std::io::Result<Upload> {
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&dir)?;
        let base = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload".into());
        // A name nobody else uses: pid and a process-wide counter.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{base}.kiln-upload-{}-{n}", std::process::id()));
        let file = File::create(&tmp)?;
        Ok(Upload {
            dest,
            tmp,
            file: Some(file),
            written: 0,
            maxsize,
            kind,
            times: None,
            unpacked: false,
            done: false,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        let file = self.file.as_mut().ok_or("the upload was already closed")?;
        self.written += data.len() as u64;
        if let Some(max) = self.maxsize {
            if self.written > max {
                return Err(format!("the upload is larger than maxsize ({max} bytes)"));
            }
        }
        file.write_all(data)
            .map_err(|e| format!("cannot write {}: {e}", self.tmp.display()))
    }

    fn close(&mut self) -> Result<(), String> {
        if let Some(f) = self.file.take() {
            f.sync_all()
                .map_err(|e| format!("cannot write {}: {e}", self.tmp.display()))?;
        }
        Ok(())
    }

    /// Unpacks a directory upload into its destination.
    fn unpack(&mut self) -> Result<(), String> {
        self.close()?;
        let UploadKind::Directory { compress } = &self.kind else {
            return Err("`update_upload_directory_unpack` for a file upload".into());
        };
        let f = File::open(&self.tmp).map_err(|e| e.to_string())?;
        let reader: Box<dyn Read> = match compress.as_deref() {
            Some("gz") => Box::new(flate2::read::GzDecoder::new(f)),
            Some("bz2") => Box::new(bzip2::read::BzDecoder::new(f)),
            _ => Box::new(f),
        };
        std::fs::create_dir_all(&self.dest)
            .map_err(|e| format!("cannot create {}: {e}", self.dest.display()))?;
        // `unpack` refuses entries that would land outside the directory.
        tar::Archive::new(reader)
            .unpack(&self.dest)
            .map_err(|e| format!("cannot unpack into {}: {e}", self.dest.display()))?;
        self.unpacked = true;
        Ok(())
    }

    /// Ends the upload: when the command succeeded the file is moved into
    /// place (with its mode and times), else it is discarded. Returns what
    /// was delivered, for the step's log.
    pub fn finish(mut self, succeeded: bool) -> Result<String, String> {
        self.done = true;
        let _ = self.close();
        if !succeeded {
            let _ = std::fs::remove_file(&self.tmp);
            return Err("the upload failed; nothing was kept".into());
        }
        match self.kind {
            UploadKind::Directory { .. } => {
                let _ = std::fs::remove_file(&self.tmp);
                if !self.unpacked {
                    return Err("the worker never asked to unpack the directory".into());
                }
                Ok(format!("unpacked into {}", self.dest.display()))
            }
            UploadKind::File { mode } => {
                if let Some(mode) = mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&self.tmp, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| {
                            format!("cannot set the mode of {}: {e}", self.tmp.display())
                        })?;
                }
                if let Some((atime, mtime)) = self.times {
                    let t = |secs: f64| {
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0))
                    };
                    let times = std::fs::FileTimes::new()
                        .set_accessed(t(atime))
                        .set_modified(t(mtime));
                    File::options()
                        .write(true)
                        .open(&self.tmp)
                        .and_then(|f| f.set_times(times))
                        .map_err(|e| {
                            format!("cannot set the times of {}: {e}", self.tmp.display())
                        })?;
                }
                std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
                    let _ = std::fs::remove_file(&self.tmp);
                    format!("cannot move the upload to {}: {e}", self.dest.display())
                })?;
                Ok(format!("{} bytes to {}", self.written, self.dest.display()))
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Download {
    pub fn new(source: Box<dyn Read + Send>) -> Download {
        Download { source }
    }
}

/// The largest block the worker may ask for at once.
const MAX_READ: u64 = 16 << 20;

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::Binary(b) => Some(b),
        Value::String(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn secs_of(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::F64(f) => Some(*f),
        Value::F32(f) => Some(f64::from(*f)),
        other => other.as_i64().map(|i| i as f64),
    }
}

impl Transfer {
    /// Answers one of the worker's transfer requests.
    pub fn handle(&mut self, op: &str, msg: &Value) -> Result<Value, String> {
        match (self, op) {
            (Transfer::Upload(u), "update_upload_file_write" | "update_upload_directory_write") => {
                let data = map_get(msg, "args")
                    .and_then(bytes_of)
                    .ok_or_else(|| format!("`{op}` without data"))?;
                u.write(data)?;
                Ok(Value::Nil)
            }
            (Transfer::Upload(u), "update_upload_file_close") => {
                u.close()?;
                Ok(Value::Nil)
            }
            (Transfer::Upload(u), "update_upload_file_utime") => {
                let a = secs_of(map_get(msg, "access_time"));
                let m = secs_of(map_get(msg, "modified_time"));
                match (a, m) {
                    (Some(a), Some(m)) => {
                        u.times = Some((a, m));
                        Ok(Value::Nil)
                    }
                    _ => Err("`update_upload_file_utime` without times".into()),
                }
            }
            (Transfer::Upload(u), "update_upload_directory_unpack") => {
                u.unpack()?;
                Ok(Value::Nil)
            }
            (Transfer::Download(d), "update_read_file") => {
                let length = map_get(msg, "length")
                    .and_then(Value::as_u64)
                    .ok_or("`update_read_file` without a length")?
                    .min(MAX_READ);
                let mut buf = Vec::new();
                (&mut d.source)
                    .take(length)
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("cannot read the file to send: {e}"))?;
                Ok(Value::Binary(buf))
            }
            (Transfer::Download(_), "update_read_file_close") => Ok(Value::Nil),
            (t, op) => Err(format!(
                "`{op}` does not belong to this command ({})",
                match t {
                    Transfer::Upload(_) => "an upload",
                    Transfer::Download(_) => "a download",
                }
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::protocol::map;

    fn write(t: &mut Transfer, data: &[u8]) -> Result<Value, String> {
        t.handle(
            "update_upload_file_write",
            &map(vec![("args", Value::Binary(data.to_vec()))]),
        )
    }

    #[test]
    fn an_upload_lands_only_when_it_succeeds() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("sub/out.txt");
        let mut t = Transfer::Upload(
            Upload::new(dest.clone(), None, UploadKind::File { mode: Some(0o600) }).expect("new"),
        );
        write(&mut t, b"hello ").expect("write");
        write(&mut t, b"world").expect("write");
        t.handle("update_upload_file_close", &map(vec![]))
            .expect("close");
        assert!(!dest.exists(), "not before the command succeeded");
        let Transfer::Upload(u) = t else {
            unreachable!()
        };
        u.finish(true).expect("finish");
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "hello world");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing else is left in the directory.
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("sub"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["out.txt"]);
    }

    #[test]
    fn a_failed_or_abandoned_upload_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("out.txt");
        std::fs::write(&dest, "old").expect("old");
        let mut u =
            Upload::new(dest.clone(), Some(4), UploadKind::File { mode: None }).expect("new");
        u.write(b"1234").expect("within maxsize");
        assert!(u.write(b"5").unwrap_err().contains("maxsize"));
        assert!(u.finish(false).is_err());
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "old");
        {
            let mut u =
                Upload::new(dest.clone(), None, UploadKind::File { mode: None }).expect("new");
            u.write(b"partial").expect("write");
        }
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 1);
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "old");
    }

    #[test]
    fn a_download_is_read_in_the_blocks_asked_for() {
        let mut t = Transfer::Download(Download::new(Box::new(std::io::Cursor::new(
            b"abcdefg".to_vec(),
        ))));
        let ask = |t: &mut Transfer, n: u64| {
            t.handle("update_read_file", &map(vec![("length", Value::from(n))]))
                .expect("read")
        };
        assert_eq!(ask(&mut t, 3), Value::Binary(b"abc".to_vec()));
        assert_eq!(ask(&mut t, 10), Value::Binary(b"defg".to_vec()));
        assert_eq!(ask(&mut t, 10), Value::Binary(vec![]));
        assert!(t
            .handle("update_upload_file_write", &map(vec![]))
            .unwrap_err()
            .contains("does not belong"));
    }
}

//! The master's handling of what a worker sends, against hostile input:
//! any request (known ops with wrong types, unknown ops, unknown command
//! ids, transfer calls out of order) is answered or refused with a reason,
//! never a panic; and a directory upload's tarball cannot write outside its
//! destination. (The frame decoder has its own in `kiln-protocol`.)
//! `bench/fuzz.sh` runs them at length.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::transfer::{Download, Transfer, Upload, UploadKind};
use super::{handle_worker_request, CommandEvent, WorkerConn};

/// A connection with command `1` running, an upload (`2`, a directory),
/// an upload (`3`, a file) and a download (`4`) in progress.
fn connection(dir: &std::path::Path) -> (WorkerConn, mpsc::Receiver<CommandEvent>) {
    let (out, _) = mpsc::channel(8);
    let (tx, rx) = mpsc::channel(1024);
    let mut commands = HashMap::new();
    for id in ["1", "2", "3", "4"] {
        commands.insert(id.to_string(), tx.clone());
    }
    let mut transfers = HashMap::new();
    let dir_upload = Upload::new(
        dir.join("unpacked"),
        Some(1 << 20),
        UploadKind::Directory { compress: None },
    )
    .expect("upload");
    transfers.insert("2".to_string(), Transfer::Upload(dir_upload));
    let file_upload = Upload::new(
        dir.join("file.bin"),
        Some(1 << 20),
        UploadKind::File { mode: None },
    )
    .expect("upload");
    transfers.insert("3".to_string(), Transfer::Upload(file_upload));
    let source: Box<dyn std::io::Read + Send> = Box::new(std::io::Cursor::new(vec![7u8; 4096]));
    transfers.insert("4".to_string(), Transfer::Download(Download::new(source)));
    let conn = WorkerConn {
        name: "w1".into(),
        info: std::sync::OnceLock::new(),
        out,
        pending: Arc::default(),
        commands: Arc::new(Mutex::new(commands)),
        transfers: Mutex::new(transfers),
        seq: AtomicU64::new(1),
        next_command: AtomicU64::new(1),
        closed: CancellationToken::new(),
        draining: Default::default(),
        shutdown_sent: Default::default(),
    };
    (conn, rx)
}

fn op() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "update",
            "complete",
            "update_upload_file_write",
            "update_upload_file_close",
            "update_upload_file_utime",
            "update_upload_directory_write",
            "update_upload_directory_unpack",
            "update_read_file",
            "update_read_file_close",
            "keepalive",
            "start_command",
        ])
        .prop_map(String::from),
        "[a-z_]{0,24}",
    ]
}

/// Any MessagePack value, a few levels deep.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((".{0,8}".prop_map(Value::from), inner), 0..4)
                .prop_map(Value::Map),
        ]
    })
}

/// A request's map: a command id (running, unknown or of a wrong type)
/// and keys of the shapes the ops read, or anything.
fn message() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        prop::sample::select(vec!["1", "2", "3", "4", "99", ""]).prop_map(Value::from),
        value(),
    ];
    let args = prop_oneof![
        // `update`'s list of [key, value] pairs.
        prop::collection::vec(
            (
                prop::sample::select(vec!["stdout", "stderr", "header", "rc", "elapsed", "log"]),
                value()
            )
                .prop_map(|(k, v)| Value::Array(vec![Value::from(k), v])),
            0..4
        )
        .prop_map(Value::Array),
        value(),
    ];
    (
        prop::option::of(id),
        prop::option::of(args),
        prop::option::of(value()),
        prop::option::of(value()),
    )
        .prop_map(|(id, args, length, time)| {
            let mut m = Vec::new();
            if let Some(id) = id {
                m.push((Value::from("command_id"), id));
            }
            if let Some(a) = args {
                m.push((Value::from("args"), a));
            }
            if let Some(l) = length {
                m.push((Value::from("length"), l));
            }
            if let Some(t) = time {
                m.push((Value::from("access_time"), t.clone()));
                m.push((Value::from("modified_time"), t));
            }
            Value::Map(m)
        })
}

proptest! {
    #[test]
    fn fuzz_any_worker_request_is_answered_or_refused_with_a_reason(
        requests in prop::collection::vec((op(), message()), 1..12),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let (conn, _events) = connection(tmp.path());
        // A well-formed update of a running command is taken.
        let update = Value::Map(vec![
            (Value::from("command_id"), Value::from("1")),
            (Value::from("args"), Value::Array(vec![Value::Array(vec![Value::from("rc"), Value::from(0)])])),
        ]);
        prop_assert!(handle_worker_request(&conn, "update", &update).is_ok());
        for (op, msg) in &requests {
            match handle_worker_request(&conn, op, msg) {
                Ok(_) => {}
                Err(why) => prop_assert!(!why.is_empty()),
            }
            let known = ["update", "complete"].contains(&op.as_str())
                || op.starts_with("update_upload_")
                || op.starts_with("update_read_file");
            if !known {
                let answer = handle_worker_request(&conn, op, msg);
                prop_assert!(matches!(&answer, Err(why) if why.contains("unexpected request")));
            }
        }
        // Whatever came, nothing was written beside the transfers'
        // destinations.
        for entry in std::fs::read_dir(tmp.path()).expect("dir") {
            let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
            prop_assert!(
                name == "unpacked" || name.starts_with(".file.bin") || name.starts_with(".unpacked")
                    || name == "file.bin",
                "unexpected {}", name
            );
        }
    }
}

#[test]
fn a_hostile_tarball_cannot_write_outside_its_destination() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dest = tmp.path().join("dest");
    // Entries that try to leave: `..`, an absolute path, and a symlink to
    // the parent followed by a file through it.
    let mut tarball = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tarball);
        let mut raw = |name: &[u8], kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.set_link_name(l).expect("link");
            }
            h.set_cksum();
            b.append(&h, data).expect("append");
        };
        raw(
            b"../escaped-dotdot.txt",
            tar::EntryType::Regular,
            None,
            b"x",
        );
        raw(b"/tmp-absolute.txt", tar::EntryType::Regular, None, b"x");
        raw(b"link", tar::EntryType::Symlink, Some(".."), b"");
        raw(
            b"link/escaped-symlink.txt",
            tar::EntryType::Regular,
            None,
            b"x",
        );
        raw(b"fine.txt", tar::EntryType::Regular, None, b"ok");
        b.finish().expect("finish");
    }
    let mut t = Transfer::Upload(
        Upload::new(dest.clone(), None, UploadKind::Directory { compress: None }).expect("upload"),
    );
    let write = rmpv::Value::Map(vec![(Value::from("args"), Value::Binary(tarball))]);
    t.handle("update_upload_directory_write", &write)
        .expect("write");
    // Refused or unpacked in part: either way, nothing lands outside.
    let _ = t.handle("update_upload_directory_unpack", &Value::Map(vec![]));
    for escaped in [
        "escaped-dotdot.txt",
        "escaped-symlink.txt",
        "tmp-absolute.txt",
    ] {
        assert!(!tmp.path().join(escaped).exists(), "{escaped} escaped");
    }
    assert!(!std::path::Path::new("/tmp-absolute.txt").exists());
}

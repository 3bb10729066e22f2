//! Workers over Buildbot's msgpack protocol, against a stock
//! `buildbot-worker` 4.3 (installed by `.ci/test` into target/tools/venv)
//! and raw WebSocket clients that misbehave.

mod connections;
mod dispatch;
mod steps;

use crate::common;

use std::path::{Path, PathBuf};

use common::workers::Script;
use common::Master;

pub(super) fn master_dir(root: &Path) -> PathBuf {
    master_with_steps(
        root,
        r#"f.addStep(ShellCommand(#{ command: ["echo", "hi"] }));"#,
    )
}

pub(super) fn master_with_steps(root: &Path, steps: &str) -> PathBuf {
    Script::steps(steps)
        .worker_expr(r#"Worker("w1", secret("w1"))"#)
        .worker("w2", "pw-two")
        .builder("b", &["w1", "w2"], "")
        .secret("w1", "pw-one\n")
        .write(root)
}

/// A JSON-RPC call to the master's control API: (status, answer).
pub(super) fn rpc(
    master: &Master,
    path: &str,
    method: &str,
    params: serde_json::Value,
) -> (u16, String) {
    common::http(
        "POST",
        &format!("{}{path}", master.http_url()),
        None,
        &[],
        common::Body::Json(
            serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }),
        ),
    )
}

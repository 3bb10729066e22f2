//! Workers over Buildbot's msgpack protocol, against a stock
//! `buildbot-worker` 4.3 (installed by `.ci/test` into target/tools/venv)
//! and raw WebSocket clients that misbehave.

mod connections;
mod dispatch;
mod steps;

use crate::common;

use std::path::{Path, PathBuf};

use common::Master;

pub(super) fn master_dir(root: &Path) -> PathBuf {
    master_with_steps(
        root,
        r#"f.addStep(ShellCommand(#{ command: ["echo", "hi"] }));"#,
    )
}

pub(super) fn master_with_steps(root: &Path, steps: &str) -> PathBuf {
    let dir = root.join("master");
    std::fs::create_dir_all(dir.join("secrets")).expect("mkdir");
    std::fs::write(dir.join("secrets/w1"), "pw-one\n").expect("secret");
    std::fs::write(
        dir.join("master.rhai"),
        r#"
let f = BuildFactory();
STEPS
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", secret("w1")), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1", "w2"], factory: f })],
}
"#
        .replace("STEPS", steps),
    )
    .expect("master.rhai");
    dir
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

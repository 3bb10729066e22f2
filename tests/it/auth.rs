//! Who may write over HTTP: every write (force, stop, cancel, rebuild,
//! reconfig, a worker's shutdown) with no user, a wrong password, a user
//! without the role, and one with it; a write from another site; reads
//! behind a login; what the web page is told a user may do.

use crate::common;

use std::time::Duration;

use common::workers::*;
use common::{wait_until, Master};
use serde_json::{json, Value};

const SCRIPT: &str = r#"
let slow = BuildFactory();
slow.addStep(ShellCommand(#{ name: "sleep", command: ["sleep", "60"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{
        port: 0,
        public_read: false,
        users: #{
            ann: #{ password: secret("pw-ann"), roles: ["admins"] },
            dev: #{ password: secret("pw-dev"), roles: ["developers"] },
            guest: #{ password: secret("pw-guest") },
        },
        authz: #{
            force: ["developers", "admins"],
            stop: ["admins"],
            cancel: ["developers"],
            rebuild: ["admins"],
            reconfig: ["admins"],
            workers: ["admins"],
            change: ["admins"],
        },
        change_hook_dialects: #{ base: true },
    },
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["slow", "waits"] })],
    builders: [BuilderConfig(#{ name: "slow", workernames: ["w1"], factory: slow }),
               // w2 never connects: requests for `waits` wait.
               BuilderConfig(#{ name: "waits", workernames: ["w2"], factory: slow })],
}
"#;

/// (status, JSON body) of a request, with optional Basic credentials and
/// extra headers.
fn call(
    method: &str,
    url: &str,
    who: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let body = match body {
        Some(v) => common::Body::Json(v),
        None => common::Body::None,
    };
    let (code, text) = common::http(method, url, who, headers, body);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn rpc(method: &str, params: Value) -> Option<Value> {
    Some(json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
}

const ANN: Option<(&str, &str)> = Some(("ann", "pw-ann"));
const DEV: Option<(&str, &str)> = Some(("dev", "pw-dev"));
const GUEST: Option<(&str, &str)> = Some(("guest", "pw-guest"));

/// The four who-cases of one write: no user and a wrong password are 401,
/// `wrong` (a user without the role) is 403 naming the role, and `right`
/// gets 200 and the answer's body.
fn matrix(
    url: &str,
    body: &Option<Value>,
    wrong: Option<(&str, &str)>,
    right: Option<(&str, &str)>,
) -> Value {
    let (code, _) = call("POST", url, None, &[], body.clone());
    assert_eq!(code, 401, "{url} without a user");
    let (code, _) = call("POST", url, Some(("ann", "not-it")), &[], body.clone());
    assert_eq!(code, 401, "{url} with a wrong password");
    let (code, v) = call("POST", url, wrong, &[], body.clone());
    assert_eq!(code, 403, "{url} with a user without the role: {v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("roles"),
        "the refusal names the roles: {v}"
    );
    let (code, v) = call("POST", url, right, &[], body.clone());
    assert_eq!(code, 200, "{url} with the role: {v}");
    v
}

#[test]
fn every_write_needs_a_user_with_its_role_and_reads_need_a_login() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(tmp.path(), SCRIPT);
    for name in ["pw-ann", "pw-dev", "pw-guest"] {
        write_secret(&dir, name, name);
    }
    let master = Master::start(&dir);
    let url = master.http_url();
    let api = format!("{url}/api/v2");
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");

    // Reads: public_read is false.
    assert_eq!(
        call("GET", &format!("{api}/builders"), None, &[], None).0,
        401
    );
    assert_eq!(
        call(
            "GET",
            &format!("{api}/builders"),
            Some(("dev", "x")),
            &[],
            None
        )
        .0,
        401
    );
    let (code, builders) = call("GET", &format!("{api}/builders"), GUEST, &[], None);
    assert_eq!(code, 200);
    assert_eq!(builders["meta"]["total"], 2);
    assert_eq!(
        call("GET", &format!("{url}/health"), None, &[], None).0,
        200,
        "health stays open"
    );

    // Force: developers and admins; a guest has neither.
    let force_url = format!("{api}/forceschedulers/force");
    let forced = matrix(
        &force_url,
        &rpc("force", json!({ "builderNames": ["waits"] })),
        GUEST,
        DEV,
    );
    let result = &forced["result"];
    let waiting: i64 = result[1]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(Value::as_i64)
        .expect("the new request's id");
    let request = || {
        call(
            "GET",
            &format!("{api}/buildrequests/{waiting}"),
            DEV,
            &[],
            None,
        )
        .1
    };
    assert_eq!(request()["buildrequests"][0]["complete"], false);

    // A write from a page of another site is refused, credentials or not.
    let (code, v) = call(
        "POST",
        &force_url,
        DEV,
        &[("Origin", "https://elsewhere.example")],
        rpc("force", json!({ "builderNames": ["waits"] })),
    );
    assert_eq!(code, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("another site"),
        "{v}"
    );

    // Cancel: developers only (an admin is not one).
    let cancelled = matrix(
        &format!("{api}/buildrequests/{waiting}"),
        &rpc("cancel", json!({ "reason": "not needed" })),
        ANN,
        DEV,
    );
    assert!(cancelled["result"]
        .as_str()
        .unwrap_or("")
        .contains("cancelled"));
    let req = request();
    assert_eq!(req["buildrequests"][0]["complete"], true);
    assert_eq!(req["buildrequests"][0]["results"], 6, "CANCELLED");
    let (code, again) = call(
        "POST",
        &format!("{api}/buildrequests/{waiting}"),
        DEV,
        &[],
        rpc("cancel", json!({})),
    );
    assert_eq!(
        code, 409,
        "a complete request cannot be cancelled again: {again}"
    );

    // Stop: admins only. A build of `slow` runs on w1.
    let (code, _) = call(
        "POST",
        &force_url,
        ANN,
        &[],
        rpc("force", json!({ "builderNames": ["slow"] })),
    );
    assert_eq!(code, 200);
    let buildid = wait_until(Duration::from_secs(60), "the slow build runs", || {
        let (_, b) = call(
            "GET",
            &format!("{api}/builds?complete=false"),
            DEV,
            &[],
            None,
        );
        b["builds"][0]["buildid"].as_i64()
    });
    matrix(
        &format!("{api}/builds/{buildid}"),
        &rpc("stop", json!({ "reason": "enough" })),
        DEV,
        ANN,
    );
    wait_until(
        Duration::from_secs(60),
        "the stopped build ends CANCELLED",
        || {
            let (_, b) = call("GET", &format!("{api}/builds/{buildid}"), DEV, &[], None);
            (b["builds"][0]["results"] == 6).then_some(())
        },
    );

    // Rebuild of the stopped build: admins only; a new request of its
    // builder, which builds (and is stopped in its turn).
    let rebuilt = matrix(
        &format!("{api}/builds/{buildid}"),
        &rpc("rebuild", json!({})),
        DEV,
        ANN,
    );
    let brid = rebuilt["result"][1]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(Value::as_i64)
        .expect("the rebuild's request");
    let (_, req) = call(
        "GET",
        &format!("{api}/buildrequests/{brid}"),
        DEV,
        &[],
        None,
    );
    let (_, old) = call("GET", &format!("{api}/builds/{buildid}"), DEV, &[], None);
    assert_eq!(
        req["buildrequests"][0]["builderid"],
        old["builds"][0]["builderid"]
    );
    let again = wait_until(Duration::from_secs(60), "the rebuild runs", || {
        let (_, b) = call(
            "GET",
            &format!("{api}/builds?complete=false"),
            DEV,
            &[],
            None,
        );
        b["builds"][0]["buildid"].as_i64()
    });
    assert_ne!(again, buildid);
    let (code, _) = call(
        "POST",
        &format!("{api}/builds/{again}"),
        ANN,
        &[],
        rpc("stop", json!({})),
    );
    assert_eq!(code, 200);
    let (code, v) = call(
        "POST",
        &format!("{api}/builds/{buildid}"),
        ANN,
        &[],
        rpc("destroy", json!({})),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("`stop` and `rebuild`"),
        "{v}"
    );

    // What the page is told: who the user is and what it may do; the
    // page's own requests are refused without the browser's dialog.
    let (code, me) = call("GET", &format!("{api}/access"), DEV, &[], None);
    assert_eq!(code, 200);
    assert_eq!(me, json!({ "user": "dev", "may": ["force", "cancel"] }));
    let (_, me) = call("GET", &format!("{api}/access"), ANN, &[], None);
    assert_eq!(
        me["may"],
        json!(["force", "stop", "rebuild", "reconfig", "workers", "change"])
    );
    let rebuild_body = || common::Body::Json(json!({ "method": "rebuild" }));
    let bad = common::http_full(
        "POST",
        &format!("{api}/builds/{buildid}"),
        None,
        &[("X-Requested-With", "kiln")],
        rebuild_body(),
    );
    assert_eq!(bad.0, 401);
    assert!(!bad.1.contains_key("www-authenticate"), "{:?}", bad.1);
    let plain = common::http_full(
        "POST",
        &format!("{api}/builds/{buildid}"),
        None,
        &[],
        rebuild_body(),
    );
    assert_eq!(plain.0, 401);
    assert!(plain.1.contains_key("www-authenticate"), "{:?}", plain.1);

    // Reconfig: admins only.
    let reloaded = matrix(&format!("{api}/reconfig"), &None, DEV, ANN);
    assert_eq!(reloaded["reloads"][0]["applied"], true, "{reloaded}");

    // A change through the base hook: admins only, as www.authz says.
    let hook = format!("{url}/change_hook/base");
    let post_change = |who: Option<(&str, &str)>| {
        let form = [
            ("author", "dev"),
            ("comments", "via the hook"),
            ("branch", "main"),
        ];
        common::http("POST", &hook, who, &[], common::Body::Form(&form)).0
    };
    assert_eq!(post_change(None), 401);
    assert_eq!(post_change(Some(("ann", "bad"))), 401);
    assert_eq!(post_change(DEV), 403);
    assert_eq!(post_change(ANN), 200);
    let (_, changes) = call("GET", &format!("{api}/changes"), DEV, &[], None);
    assert_eq!(
        changes["meta"]["total"], 1,
        "only the admin's change is stored"
    );

    // A worker's shutdown: admins only.
    let killed = matrix(
        &format!("{api}/workers/w1"),
        &rpc("kill", json!({})),
        DEV,
        ANN,
    );
    assert!(killed["result"].is_string(), "{killed}");
    wait_until(Duration::from_secs(60), "w1 is gone", || {
        (!connected(&dir).contains(&"w1".to_string())).then_some(())
    });
}

/// Wrong passwords cost time on the web port too: each request with
/// credentials from an address waits out its failures before it, and
/// right credentials clear them.
#[test]
fn wrong_web_passwords_wait_longer_each_time_and_right_ones_clear_the_wait() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(tmp.path(), SCRIPT);
    for name in ["pw-ann", "pw-dev", "pw-guest"] {
        write_secret(&dir, name, name);
    }
    let mut master = Master::start(&dir);
    let builders = format!("{}/api/v2/builders", master.http_url());
    let timed = |who: (&str, &str)| {
        let t = std::time::Instant::now();
        let code = call("GET", &builders, Some(who), &[], None).0;
        (code, t.elapsed())
    };
    let mut waits = vec![];
    for _ in 0..4 {
        let (code, took) = timed(("dev", "guess"));
        assert_eq!(code, 401);
        waits.push(took);
    }
    for (took, least) in waits.iter().zip([0, 250, 500, 1000]) {
        assert!(*took >= Duration::from_millis(least), "{waits:?}");
    }
    // Anonymous reads are not slowed (here they are refused at once).
    let t = std::time::Instant::now();
    assert_eq!(call("GET", &builders, None, &[], None).0, 401);
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    let (code, took) = timed(("dev", "pw-dev"));
    assert_eq!(code, 200);
    assert!(took >= Duration::from_millis(2000), "{took:?}");
    let (code, took) = timed(("dev", "guess"));
    assert_eq!(code, 401);
    assert!(took < Duration::from_millis(2000), "cleared: {took:?}");
    assert_eq!(master.stop(), Some(0));
}

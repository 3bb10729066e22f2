//! The read API against a master with real builds: Buildbot's shapes,
//! filters, ordering, paging, projection and 404s.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::time::Duration;

use common::workers::*;
use common::{http_get, sse_until, wait_until, Master};
use serde_json::Value;

fn get(url: &str) -> Value {
    serde_json::from_str(&http_get(url)).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn status(url: &str) -> (u16, Value) {
    let (code, body) = common::http("GET", url, None, &[], common::Body::None);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn names(v: &Value, list: &str, field: &str) -> Vec<Value> {
    v[list]
        .as_array()
        .expect("list")
        .iter()
        .map(|x| x[field].clone())
        .collect()
}

#[test]
fn the_read_api_serves_buildbots_collections_with_its_query_conventions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let ok = BuildFactory();
ok.addStep(ShellCommand(#{ name: "hello", command: ["echo", "hello api"] }));
let bad = BuildFactory();
bad.addStep(ShellCommand(#{ name: "fails", command: ["false"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["good", "broken"] })],
    builders: [BuilderConfig(#{ name: "good", workernames: ["w1"], factory: ok }),
               BuilderConfig(#{ name: "broken", workernames: ["w1"], factory: bad })],
}
"#,
    );
    let master = Master::start(&dir);
    let url = master.http_url();
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "good");
    force(&master, "broken");
    force_and_wait(&master, "good", 3);
    kiln_ok(
        &dir,
        &[
            "sendchange",
            "--master",
            &url,
            "--who",
            "dev <dev@example.org>",
            "--branch",
            "main",
            "-m",
            "a change",
            "src/a.c",
            "docs/b.md",
        ],
    );
    let api = format!("{url}/api/v2");

    // Builders, by id and by name; a missing one is a JSON 404.
    let b = get(&format!("{api}/builders"));
    assert_eq!(b["meta"]["total"], 2);
    let good_id = b["builders"]
        .as_array()
        .expect("builders")
        .iter()
        .find(|x| x["name"] == "good")
        .expect("good")["builderid"]
        .clone();
    assert_eq!(
        get(&format!("{api}/builders/good"))["builders"][0]["builderid"],
        good_id
    );
    assert_eq!(
        get(&format!("{api}/builders/{good_id}"))["builders"][0]["name"],
        "good"
    );
    let (code, body) = status(&format!("{api}/builders/nosuch"));
    assert_eq!(code, 404);
    assert_eq!(body["error"], "no builder `nosuch`");

    // Builds: fields as Buildbot names them; filters, order, paging.
    let all = get(&format!("{api}/builds"));
    assert_eq!(all["meta"]["total"], 3);
    let first = &all["builds"][0];
    for f in [
        "buildid",
        "number",
        "builderid",
        "buildrequestid",
        "workerid",
        "masterid",
        "started_at",
        "complete_at",
        "complete",
        "state_string",
        "results",
    ] {
        assert!(first.get(f).is_some(), "{f} in {first}");
    }
    assert_eq!(first["complete"], true);
    let good = get(&format!("{api}/builders/good/builds"));
    assert_eq!(names(&good, "builds", "number"), [1, 2]);
    let failed = get(&format!("{api}/builds?results=2"));
    assert_eq!(failed["meta"]["total"], 1);
    assert_eq!(failed["builds"][0]["state_string"], "FAILURE");
    assert_eq!(
        get(&format!("{api}/builds?results__ne=2"))["meta"]["total"],
        2
    );
    assert_eq!(
        get(&format!("{api}/builds?results=0&results=2"))["meta"]["total"],
        3
    );
    let newest = get(&format!(
        "{api}/builds?order=-buildid&limit=1&field=buildid&field=number"
    ));
    assert_eq!(newest["meta"]["total"], 3, "total counts before paging");
    assert_eq!(newest["builds"].as_array().expect("list").len(), 1);
    assert_eq!(
        newest["builds"][0],
        serde_json::json!({ "buildid": 3, "number": 2 })
    );
    let paged = get(&format!(
        "{api}/builds?order=buildid&offset=1&limit=1&field=buildid"
    ));
    assert_eq!(paged["builds"], serde_json::json!([{ "buildid": 2 }]));
    assert_eq!(
        get(&format!("{api}/builds?buildid__gt=1&buildid__le=2"))["meta"]["total"],
        1
    );
    let (code, body) = status(&format!("{api}/builds?colour=red"));
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("unknown field `colour`"),
        "{body}"
    );
    let (code, _) = status(&format!("{api}/builds?results__near=1"));
    assert_eq!(code, 400);
    let (code, body) = status(&format!("{api}/builds/99"));
    assert_eq!((code, body["error"].as_str()), (404, Some("no build `99`")));

    // Steps, logs and their contents.
    let steps = get(&format!("{api}/builds/1/steps"));
    assert_eq!(names(&steps, "steps", "name"), ["hello"]);
    let stepid = steps["steps"][0]["stepid"].clone();
    let logs = get(&format!("{api}/steps/{stepid}/logs"));
    assert_eq!(logs["logs"][0]["slug"], "stdio");
    let logid = logs["logs"][0]["logid"].clone();
    let raw = http_get(&format!("{api}/logs/{logid}/raw"));
    assert!(raw.lines().any(|l| l == "hello api"), "{raw}");
    let chunks = get(&format!("{api}/logs/{logid}/contents"));
    let chunk_list = chunks["logchunks"].as_array().expect("chunks");
    assert_eq!(chunk_list[0]["firstline"], 0);
    let joined: String = chunk_list
        .iter()
        .map(|c| c["content"].as_str().unwrap_or(""))
        .collect();
    assert!(joined.contains("\nohello api\n"), "{chunks}");
    // raw is the same lines, without their stream prefix.
    assert_eq!(raw.lines().count(), joined.lines().count());
    let (code, _) = status(&format!("{api}/logs/999/contents"));
    assert_eq!(code, 404);

    // Requests, buildsets, changes, workers.
    let reqs = get(&format!("{api}/buildrequests?complete=true"));
    assert_eq!(reqs["meta"]["total"], 3);
    assert_eq!(
        get(&format!("{api}/buildrequests?claimed=false"))["meta"]["total"],
        0
    );
    assert_eq!(get(&format!("{api}/buildsets"))["meta"]["total"], 3);
    let changes = get(&format!("{api}/changes?author__contains=dev@example.org"));
    assert_eq!(changes["meta"]["total"], 1);
    assert_eq!(
        changes["changes"][0]["files"],
        serde_json::json!(["src/a.c", "docs/b.md"])
    );
    assert_eq!(
        get(&format!("{api}/changes?files__contains=docs/b.md"))["meta"]["total"],
        1
    );
    assert_eq!(
        get(&format!("{api}/changes?branch=other"))["meta"]["total"],
        0
    );
    let workers = get(&format!("{api}/workers/w1"));
    assert_eq!(workers["workers"][0]["name"], "w1");
    assert_eq!(
        workers["workers"][0]["connected_to"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Schedulers, as Buildbot lists them.
    let scheds = get(&format!("{api}/schedulers"));
    assert_eq!(scheds["meta"]["total"], 1);
    let force = &scheds["schedulers"][0];
    assert_eq!(force["name"], "force");
    assert_eq!(force["enabled"], true);
    assert_eq!(force["master"]["active"], true);
    let by_id = get(&format!("{api}/schedulers/{}", force["schedulerid"]));
    assert_eq!(by_id["schedulers"][0]["name"], "force");
    assert_eq!(status(&format!("{api}/schedulers/nope")).0, 404);
    assert_eq!(
        get(&format!("{api}/schedulers?name=other"))["meta"]["total"],
        0
    );
}

#[test]
fn metrics_count_builds_waiting_requests_workers_failed_polls_and_reloads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let ok = BuildFactory();
ok.addStep(ShellCommand(#{ command: ["true"] }));
let bad = BuildFactory();
bad.addStep(ShellCommand(#{ command: ["false"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    // A repository that does not exist: every poll fails.
    change_source: [HgPoller(#{ hgURL: "../nosuch", branch: "", pollInterval: 1 })],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["good", "broken", "waits"] })],
    builders: [BuilderConfig(#{ name: "good", workernames: ["w1"], factory: ok }),
               BuilderConfig(#{ name: "broken", workernames: ["w1"], factory: bad }),
               // w2 never connects.
               BuilderConfig(#{ name: "waits", workernames: ["w2"], factory: ok })],
}
"#,
    );
    let master = Master::start_with(&dir, &["--no-watch"]);
    let url = master.http_url();
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    for b in ["good", "good", "broken", "waits"] {
        force(&master, b);
    }
    wait_until(Duration::from_secs(60), "three builds", || {
        finished(&dir, 3).then_some(())
    });
    master.wait_for_log("poll failed", 1, Duration::from_secs(60));
    let (code, _) = common::post_form(&format!("{url}/api/v2/reconfig"), &[]);
    assert_eq!(code, 200);

    let text = http_get(&format!("{url}/metrics"));
    for line in [
        r#"kiln_builds_total{builder="good",result="SUCCESS"} 2"#,
        r#"kiln_builds_total{builder="broken",result="FAILURE"} 1"#,
        r#"kiln_build_requests_pending{builder="waits"} 1"#,
        "kiln_request_wait_seconds_count 3",
        "kiln_workers_connected 1",
        r#"kiln_reloads_total{applied="true"} 1"#,
        "kiln_reload_duration_seconds_count 1",
        "# TYPE kiln_builds_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"kiln_poll_errors_total{source="HgPoller ../nosuch"} "#))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("poll errors in\n{text}"));
    assert!(errors >= 1);
    assert_has(&text, "kiln_store_query_seconds ");
}

#[test]
fn the_event_stream_follows_a_build_from_request_to_result_and_tails_a_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(ShellCommand(#{ name: "talk", command: ["sh", "-c", "sleep 2; echo first-line; sleep 1; echo second-line"] }));"#).write(tmp.path());
    let master = Master::start(&dir);
    let url = master.http_url();
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");

    assert_eq!(status(&format!("{url}/api/v2/events?topics=bilds")).0, 400);

    let all = sse_until(
        &format!("{url}/api/v2/events"),
        Duration::from_secs(60),
        || force(&master, "b"),
        |evs| {
            evs.iter()
                .any(|(n, d)| n == "builds" && d["event"] == "finished")
        },
    );
    let seen: Vec<String> = all
        .iter()
        .map(|(n, d)| format!("{n}/{}", d["event"].as_str().unwrap_or("?")))
        .collect();
    let at = |what: &str| {
        seen.iter()
            .position(|s| s == what)
            .unwrap_or_else(|| panic!("no {what} in {seen:?}"))
    };
    assert!(
        at("buildsets/new") < at("buildrequests/claimed"),
        "{seen:?}"
    );
    assert!(at("buildrequests/new") < at("builds/new"), "{seen:?}");
    assert!(at("builds/new") < at("steps/started"), "{seen:?}");
    assert!(at("steps/started") < at("logs/new"), "{seen:?}");
    assert!(at("steps/finished") < at("builds/finished"), "{seen:?}");
    assert!(
        !seen.iter().any(|s| s == "logs/append"),
        "log lines only go to who asks for the log: {seen:?}"
    );
    let finished = &all
        .iter()
        .rev()
        .find(|(n, _)| n == "builds")
        .expect("build")
        .1;
    assert_eq!(finished["data"]["results"], 0);
    assert_eq!(finished["data"]["buildid"], finished["id"]);

    // Tail the stdio log of the next build's step while it runs.
    force(&master, "b");
    let logid = wait_until(Duration::from_secs(60), "the second build's log", || {
        let logs = get(&format!("{url}/api/v2/logs?order=-logid&limit=1"));
        let log = &logs["logs"][0];
        (log["logid"].as_i64().is_some()
            && get(&format!("{url}/api/v2/steps/{}", log["stepid"]))["steps"][0]["buildid"]
                != finished["id"])
            .then(|| log["logid"].as_i64())
            .flatten()
    });
    let tail = sse_until(
        &format!("{url}/api/v2/events?topics=logs&logs={logid}"),
        Duration::from_secs(60),
        || (),
        |evs| {
            evs.iter().any(|(_, d)| {
                d["data"]["lines"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|x| x.as_str().unwrap_or("").contains("second-line"))
                })
            })
        },
    );
    assert!(tail.iter().all(|(n, _)| n == "logs"), "{tail:?}");
    let appended: Vec<&(String, Value)> = tail
        .iter()
        .filter(|(_, d)| d["event"] == "append")
        .collect();
    assert!(
        appended.iter().all(|(_, d)| d["id"] == logid),
        "only that log's lines: {tail:?}"
    );

    // A client still listening does not hold the master up when it stops.
    let mut master = master;
    let addr = url.trim_start_matches("http://").to_string();
    let mut listener = std::net::TcpStream::connect(&addr).expect("connect");
    use std::io::{Read, Write};
    write!(
        listener,
        "GET /api/v2/events HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    )
    .expect("request");
    let mut head = [0u8; 12];
    listener.read_exact(&mut head).expect("the stream's answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    assert_eq!(master.stop(), Some(0));
    assert!(!master.log().contains("did not stop"), "{}", master.log());
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = listener.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"),
        "the stream was ended, not cut: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

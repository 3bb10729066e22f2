//! TLS on the master's ports (Twisted's `ssl:` port strings): kiln's
//! worker over wss:// checks the master's certificate and builds, the API
//! over https, a renewed certificate read by a reload; and the web port's
//! bounds on connections that say nothing.

use crate::common;

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use common::workers::*;
use common::{wait_until, Master};

/// A self-signed certificate for localhost and 127.0.0.1: (cert, key) PEM.
fn self_signed() -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

fn write_pair(dir: &Path, (cert, key): &(String, String)) {
    std::fs::write(dir.join("cert.pem"), cert).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), key).expect("key.pem");
}

/// `kiln-worker` in `dir` for `master`, trusting `ca` (or the public
/// authorities), its log captured.
fn worker(
    root: &Path,
    name: &str,
    master: &str,
    ca: Option<&Path>,
) -> (std::process::Child, common::Captured) {
    let dir = root.join(name);
    let mut args = vec![
        "worker".to_string(),
        "create".into(),
        dir.display().to_string(),
        "--master".into(),
        master.into(),
        "--name".into(),
        "w1".into(),
        "--password".into(),
        "pw-one".into(),
    ];
    if let Some(ca) = ca {
        args.extend(["--ca-file".into(), ca.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::kiln(root, &args, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut child = std::process::Command::new(kiln_worker_exe())
        .arg("start")
        .arg(&dir)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln-worker start");
    let log = common::capture(child.stderr.take().expect("stderr"));
    (child, log)
}

/// `kiln force` of `builder` at an https `url`, trusting `ca`.
fn force_over_https(dir: &Path, url: &str, ca: &Path, builder: &str) {
    let out = common::kiln_command(dir, &["force", "--master", url, builder])
        .env("SSL_CERT_FILE", ca)
        .output()
        .expect("kiln force");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn https_client(ca_pem: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("pem"))
        .build()
        .expect("client")
}

#[test]
fn both_ports_speak_tls_a_worker_checks_the_certificate_and_a_reload_renews_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(r#"f.addStep(ShellCommand(#{ command: ["echo", "over tls"] }));"#)
        .worker("w1", "pw-one")
        .worker_expr(r#"LocalLatentWorker("l1", "pw-l1", #{ build_wait_timeout: 0 })"#)
        .builder("b", &["w1"], "")
        .builder("latent", &["l1"], "")
        .worker_port_string("ssl:0:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1")
        .www_port_string("ssl:0:privateKey=key.pem:certKey=cert.pem")
        .write(tmp.path());
    let first = self_signed();
    write_pair(&dir, &first);
    let ca = dir.join("cert.pem");
    let mut master = Master::start(&dir);
    let url = master.http_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let port = worker_port(&master);
    let wss = format!("wss://127.0.0.1:{port}");

    // A worker that trusts only the public authorities refuses the
    // master's self-signed certificate, and never logs in.
    let (mut stranger, stranger_log) = worker(tmp.path(), "stranger", &wss, None);
    wait_until(
        Duration::from_secs(30),
        "the worker refusing the certificate",
        || {
            common::captured(&stranger_log)
                .contains("UnknownIssuer")
                .then_some(())
        },
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        !master.log().contains("connected worker=w1"),
        "{}",
        master.log()
    );

    // With the certificate as its authority, it connects and builds.
    let (mut w1, w1_log) = worker(tmp.path(), "w1", &wss, Some(&ca));
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(30));
    force_over_https(&dir, &url, &ca, "b");
    wait_until(Duration::from_secs(60), "the build over TLS", || {
        finished(&dir, 1).then_some(())
    });
    assert_eq!(builds(&dir)[0].result, Some(Results::Success));
    assert!(
        all_log_text(&dir).contains("over tls"),
        "{}",
        common::captured(&w1_log)
    );

    // A local latent worker is given wss:// and the master's certificate.
    force_over_https(&dir, &url, &ca, "latent");
    wait_until(Duration::from_secs(60), "the latent worker's build", || {
        finished(&dir, 2).then_some(())
    });
    let latent = builds(&dir)
        .into_iter()
        .find(|b| b.builder == "latent")
        .expect("latent build");
    assert_eq!(
        (latent.worker.as_str(), latent.result),
        ("l1", Some(Results::Success))
    );

    // The API over https; plain http on that port gets no answer.
    let workers: serde_json::Value = https_client(&first.0)
        .get(format!("{url}/api/v2/workers"))
        .send()
        .and_then(|r| r.json())
        .expect("workers over https");
    let names: Vec<&str> = workers["workers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert!(names.contains(&"w1"), "{workers}");
    let plain = url.replacen("https://", "http://", 1);
    assert!(reqwest::blocking::get(format!("{plain}/health")).is_err());

    // A renewed certificate (a new key) is served after a reload; the
    // worker's connection stays.
    let second = self_signed();
    write_pair(&dir, &second);
    common::kiln_ok(&dir, &["reconfig", "."]);
    wait_until(
        Duration::from_secs(30),
        "the new certificate served",
        || {
            https_client(&second.0)
                .get(format!("{url}/health"))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        },
    );
    assert!(https_client(&first.0)
        .get(format!("{url}/health"))
        .send()
        .is_err());
    assert_eq!(
        common::captured(&w1_log)
            .matches("connected to wss://")
            .count(),
        1
    );

    assert_eq!(master.stop(), Some(0));
    let _ = w1.kill();
    let _ = w1.wait();
}

#[test]
fn a_key_that_cannot_be_read_stops_the_start_with_the_file_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps("")
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
        .www_port_string("ssl:0:privateKey=missing.pem:certKey=cert.pem")
        .write(tmp.path());
    write_pair(&dir, &self_signed());
    let out = common::kiln(&dir, &["start", "."], Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    common::assert_has(&out.stderr, "the web port (www.port)");
    common::assert_has(&out.stderr, "missing.pem");
}

/// Whether the master closes `conn` within `limit` (reads return 0).
fn closed_within(conn: &mut std::net::TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(limit)).expect("timeout");
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn web_connections_that_say_nothing_are_bounded_per_address_and_closed_in_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps("")
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
        .www_port_string("ssl:0:privateKey=key.pem:certKey=cert.pem")
        .write(tmp.path());
    let pair = self_signed();
    write_pair(&dir, &pair);
    let mut master = Master::start(&dir);
    let url = master.http_url();
    let addr = url.trim_start_matches("https://").to_string();
    let client = https_client(&pair.0);

    // One address's connections before their first request are bounded:
    // past the bound a new one is closed at once, and requests come
    // through again when the silent ones go.
    let silent: Vec<std::net::TcpStream> = (0..256)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    wait_until(
        Duration::from_secs(30),
        "a connection past the bound refused",
        || {
            client
                .get(format!("{url}/health"))
                .send()
                .is_err()
                .then_some(())
        },
    );
    drop(silent);
    wait_until(Duration::from_secs(30), "requests answered again", || {
        client.get(format!("{url}/health")).send().ok()
    });

    // A connection that never starts its TLS handshake is closed.
    let mut quiet = std::net::TcpStream::connect(&addr).expect("connect");
    assert!(
        closed_within(&mut quiet, Duration::from_secs(25)),
        "still open"
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_plain_web_connection_that_sends_no_request_is_closed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps("")
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
        .write(tmp.path());
    let mut master = Master::start(&dir);
    let addr = master.http_url().trim_start_matches("http://").to_string();
    let mut quiet = std::net::TcpStream::connect(&addr).expect("connect");
    assert!(
        closed_within(&mut quiet, Duration::from_secs(45)),
        "still open"
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_stock_buildbot_worker_builds_over_tls_and_checks_the_certificate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir =
        Script::steps(r#"f.addStep(ShellCommand(#{ command: ["echo", "stock over tls"] }));"#)
            .worker("w1", "pw-one")
            .builder("b", &["w1"], "")
            .worker_port_string("ssl:0:privateKey=key.pem:certKey=cert.pem")
            .write(tmp.path());
    write_pair(&dir, &self_signed());
    let ca = dir.join("cert.pem");
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let bin = common::repo_root().join("target/tools/venv/bin/buildbot-worker");
    let wdir = tmp.path().join("stock");
    let out = std::process::Command::new(&bin)
        .args([
            "create-worker",
            "--protocol",
            "msgpack_experimental_v7",
            "--use-tls",
        ])
        .arg(&wdir)
        .arg(format!("localhost:{port}"))
        .args(["w1", "pw-one"])
        .output()
        .expect("create-worker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = |ca: Option<&Path>| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["start", "--nodaemon"])
            .arg(&wdir)
            .env("PATH", common::tools_path())
            .env_remove("SSL_CERT_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(ca) = ca {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd.spawn().expect("buildbot-worker start")
    };
    let twistd_log = || std::fs::read_to_string(wdir.join("twistd.log")).unwrap_or_default();

    // Trusting the system's authorities only, Twisted refuses the
    // self-signed certificate.
    let mut stranger = start(None);
    wait_until(
        Duration::from_secs(60),
        "the stock worker refusing the certificate",
        || {
            twistd_log()
                .contains("certificate verify failed")
                .then_some(())
        },
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        !master.log().contains("connected worker=w1"),
        "{}",
        master.log()
    );

    let mut stock = start(Some(&ca));
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(
        Duration::from_secs(60),
        "the stock worker's build over TLS",
        || finished(&dir, 1).then_some(()),
    );
    assert_eq!(builds(&dir)[0].result, Some(Results::Success));
    assert!(
        all_log_text(&dir).contains("stock over tls"),
        "{}",
        twistd_log()
    );
    assert_eq!(master.stop(), Some(0));
    let _ = stock.kill();
    let _ = stock.wait();
}

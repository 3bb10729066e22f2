//! The web page in a real headless Chromium (Debian's `chromium`, driven
//! through `chromedriver` by a WebDriver client): a commit shows up as a
//! push whose builds turn green without a reload, a build's log can be
//! read, and the other pages show what the master has. Screenshots go to
//! `target/test-artifacts/`.

use crate::common;
use crate::common::assert_has;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, wait_until};
use fantoccini::{Client, ClientBuilder, Locator};

/// A process started in a process group of its own; dropping it asks the
/// whole group to stop (SIGTERM), waits up to 15 s, then kills what is
/// left, so that nothing it started (workers, browsers) outlives the test,
/// even when the test fails.
struct Guard(Child);

impl Guard {
    fn spawn(cmd: &mut Command) -> Guard {
        use std::os::unix::process::CommandExt as _;
        Guard(cmd.process_group(0).spawn().expect("spawn"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let group = -(self.0.id() as i32);
        // SAFETY: kill(2) with a process group id; no memory is touched.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The leader may be gone while others of its group are not.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn program(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: `bash .ci/test` installs Debian's chromium and chromium-driver"
    );
}

/// chromedriver on 127.0.0.1, and a WebDriver session of headless Chromium.
async fn browser(profile: &std::path::Path) -> (Guard, Client) {
    let port = free_port();
    let driver = Guard::spawn(
        Command::new(program("chromedriver"))
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": program("chromium"),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        b.capabilities(caps.clone());
        match b.connect(&format!("http://127.0.0.1:{port}")).await {
            Ok(c) => return (driver, c),
            Err(e) => {
                assert!(Instant::now() < deadline, "no WebDriver session: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.expect("script")
}

/// The text of the first element `css` finds.
async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

async fn screenshot(c: &Client, name: &str) {
    let dir = common::repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

#[test]
fn a_push_appears_and_turns_green_live_and_its_build_log_can_be_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo");
    let mut master = Guard::spawn(
        common::quickstart(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let log = common::capture(master.0.stderr.take().expect("stderr"));
    let text = || common::captured(&log);
    wait_until(
        Duration::from_secs(60),
        "both workers and a first poll",
        || {
            (text().matches("connected worker=").count() >= 2 && text().contains("first poll"))
                .then_some(())
        },
    );
    let url = {
        let t = text();
        let at = t.find("HTTP listening on ").expect("the address") + "HTTP listening on ".len();
        t[at..]
            .split_whitespace()
            .next()
            .expect("url")
            .trim_end_matches('/')
            .to_string()
    };

    let rt = common::runtime();
    let repo = dir.join("repo");
    rt.block_on(async {
        let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
        c.goto(&format!("{url}/")).await.expect("open the page");
        eventually(Duration::from_secs(30), "the page and its live stream", || async {
            let v = js(&c, "return document.getElementById('live').classList.contains('on') && !!document.querySelector('main h1');").await;
            v.as_bool().unwrap_or(false).then_some(())
        })
        .await;
        // Marks this page load: a reload would lose it.
        js(&c, "window.kilnTestMark = 'same page'; return null;").await;

        // A commit to the quickstart's repository.
        std::fs::write(repo.join("feature.txt"), "a new feature\n").expect("write");
        run(&repo, "git", &["add", "feature.txt"]);
        run(
            &repo,
            "git",
            &["commit", "-q", "--author", "Dee Veloper <dee@example.org>",
              "-m", "Bug 4242 - add the feature <b>bold</b>"],
        );
        let rev = run(&repo, "git", &["rev-parse", "HEAD"]).trim().to_string();

        let row = format!("article.push[data-revision='{rev}']");
        eventually(Duration::from_secs(60), "the push's row", || async {
            c.find(Locator::Css(&row)).await.ok()
        })
        .await;
        let jobs = format!("{row} .job");
        let states = eventually(Duration::from_secs(120), "both builds green", || async {
            let v = js(&c, &format!(
                "return [...document.querySelectorAll(\"{jobs}\")].map(a => [a.dataset.builder, a.dataset.state]);"
            ))
            .await;
            let list = v.as_array().cloned().unwrap_or_default();
            (list.len() == 2 && list.iter().all(|x| x[1] == "success")).then_some(list)
        })
        .await;
        assert_eq!(states.len(), 2, "{states:?}");
        assert_eq!(
            js(&c, "return window.kilnTestMark || null;").await,
            serde_json::json!("same page"),
            "the page changed without a reload"
        );
        // The commit message is shown as text, never as markup.
        let comments = text_of(&c, &format!("{row} .comments")).await;
        assert_has(&comments, "Bug 4242 - add the feature <b>bold</b>");
        let author = text_of(&c, &format!("{row} .pusher")).await;
        assert_eq!(author, "Dee Veloper");
        screenshot(&c, "web-pushes.png").await;

        // The `build` builder's job of this push opens its panel; from
        // there, its build page, then its log.
        c.find(Locator::Css(&format!("{row} .job[data-builder='build']")))
            .await
            .expect("the job's symbol")
            .click()
            .await
            .expect("click");
        let build_link = eventually(Duration::from_secs(30), "the job's panel", || async {
            c.find(Locator::Css("#panel a[href^='#/builds/']")).await.ok()
        })
        .await;
        assert_has(&text_of(&c, "#panel").await, "success");
        build_link.click().await.expect("click the build");
        let log_link = eventually(Duration::from_secs(30), "the build page's steps", || async {
            c.find(Locator::Css("ul.steps .logs a")).await.ok()
        })
        .await;
        let heading = text_of(&c, "main h1").await;
        assert!(heading.starts_with("build #"), "{heading}");
        log_link.click().await.expect("click the log");
        let log_text = eventually(Duration::from_secs(30), "the log's text", || async {
            let t = c.find(Locator::Css("pre#log")).await.ok()?.text().await.ok()?;
            (!t.trim().is_empty()).then_some(t)
        })
        .await;
        let raw_url = format!(
            "{url}/api/v2/logs/{}/raw",
            js(&c, "return document.getElementById('log').dataset.logid;").await.as_str().expect("logid")
        );
        let raw = reqwest::get(&raw_url).await.expect("GET").text().await.expect("raw log");
        let first = raw.lines().next().expect("a line of the stored log");
        assert!(log_text.contains(first.trim()), "page: {log_text}\nstored: {raw}");
        screenshot(&c, "web-build.png").await;

        // A second push; then the page of pushes older than it.
        std::fs::write(repo.join("feature.txt"), "a better feature\n").expect("write");
        run(
            &repo,
            "git",
            &["commit", "-q", "-a", "--author", "Dee Veloper <dee@example.org>", "-m", "Bug 4243 - improve it"],
        );
        let rev2 = run(&repo, "git", &["rev-parse", "HEAD"]).trim().to_string();
        c.goto(&format!("{url}/#/")).await.expect("pushes");
        let row2 = format!("article.push[data-revision='{rev2}']");
        eventually(Duration::from_secs(60), "the second push's row", || async {
            c.find(Locator::Css(&row2)).await.ok()
        })
        .await;
        let newest: serde_json::Value = reqwest::get(format!("{url}/api/v2/buildsets?order=-bsid&limit=1"))
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let bsid = newest["buildsets"][0]["bsid"].as_i64().expect("bsid");
        c.goto(&format!("{url}/#/pushes/before/{bsid}")).await.expect("older");
        eventually(Duration::from_secs(30), "the older page", || async {
            c.find(Locator::Css(&row)).await.ok()
        })
        .await;
        assert!(c.find(Locator::Css(&row2)).await.is_err(), "only older pushes");
        c.find(Locator::LinkText("Newest pushes")).await.expect("a way back");

        // Workers and the config page.
        c.goto(&format!("{url}/#/workers")).await.expect("workers");
        let connected = eventually(Duration::from_secs(30), "the worker list", || async {
            let v = js(&c, "return [...document.querySelectorAll('tr[data-worker] .pill.up')].length;").await;
            v.as_u64().filter(|n| *n > 0)
        })
        .await;
        assert_eq!(connected, 2, "both quickstart workers show as connected");
        c.goto(&format!("{url}/#/config")).await.expect("config");
        let files = eventually(Duration::from_secs(30), "the config page", || async {
            let t = c.find(Locator::Css("main")).await.ok()?.text().await.ok()?;
            t.contains("Watched files").then_some(t)
        })
        .await;
        assert_has(&files, "master.rhai");
        // The quickstart's poller, polling fine.
        let state = js(&c, "return [...document.querySelectorAll('#changesources tr')].map(r => r.dataset.state);").await;
        assert_eq!(state, serde_json::json!(["ok"]), "{files}");
        // A phone-sized window still shows the pushes, without scrolling sideways.
        c.set_window_size(390, 844).await.expect("resize");
        c.goto(&format!("{url}/#/")).await.expect("pushes");
        eventually(Duration::from_secs(30), "the pushes on a phone", || async {
            c.find(Locator::Css(&row)).await.ok()
        })
        .await;
        let overflow = js(&c, "return document.documentElement.scrollWidth <= window.innerWidth + 1;").await;
        assert_eq!(overflow, serde_json::json!(true), "the page itself does not scroll sideways");
        screenshot(&c, "web-pushes-phone.png").await;
        c.close().await.expect("close the browser");
    });
    drop(master);
    // Nothing the quickstart started is left.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir.display().to_string()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The workers page shows a latent worker's state live: stopped before any
/// request, then idle or building once a build started it.
#[test]
fn the_workers_page_follows_a_latent_workers_state() {
    use common::workers::{force, Script, TRUE};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(TRUE)
        .worker_expr(r#"LocalLatentWorker("lat", "pw", #{ build_wait_timeout: -1 })"#)
        .builder("b", &["lat"], "")
        .write(tmp.path());
    let mut master = common::Master::start(&dir);
    let url = master.http_url();
    let rt = common::runtime();
    rt.block_on(async {
        let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
        c.goto(&format!("{url}/#/workers")).await.expect("open the page");
        let pill = "return (document.querySelector(\"tr[data-worker='lat'] .latent\") || {}).textContent || '';";
        eventually(Duration::from_secs(30), "latent: stopped", || async {
            (js(&c, pill).await == "latent: stopped").then_some(())
        })
        .await;
        force(&master, "b");
        // Started, built, and kept (build_wait_timeout -1): idle, without
        // reloading the page.
        eventually(Duration::from_secs(60), "latent: idle", || async {
            (js(&c, pill).await == "latent: idle").then_some(())
        })
        .await;
    });
    assert_eq!(master.stop(), Some(0));
}

/// A log the janitor deleted says so on the build page, not an error.
#[test]
fn a_deleted_log_reads_as_deleted_on_the_build_page() {
    use common::workers::{force_and_wait, KilnWorker, Script, TestWorker};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "compile", command: "echo compiling nsGlobalWindow.cpp; exit 1" }));"#,
    )
    .worker("w1", "pw")
    .builder("b", &["w1"], "")
    .write(tmp.path());
    let mut master = common::Master::start(&dir);
    let w = KilnWorker::connect(&master, tmp.path(), "w1", "pw");
    force_and_wait(&master, "b", 1);
    assert_eq!(master.stop(), Some(0));
    drop(w);
    common::kiln_ok(&dir, &["cleanupdb", ".", "--log-horizon", "0"]);
    let mut master = common::Master::start(&dir);
    let url = master.http_url();
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_str(&common::http_get(&format!("{url}/api/v2/{path}"))).expect("json")
    };
    let buildid = get("builds")["builds"][0]["buildid"].clone();
    let stepid = get(&format!("builds/{buildid}/steps"))["steps"][0]["stepid"].clone();
    let logid = get(&format!("steps/{stepid}/logs"))["logs"][0]["logid"].clone();
    let rt = common::runtime();
    rt.block_on(async {
        let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
        c.goto(&format!("{url}/#/builds/{buildid}/logs/{logid}"))
            .await
            .expect("open the page");
        let shown = eventually(Duration::from_secs(30), "the log view", || async {
            let t = c
                .find(Locator::Css("pre#log"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (!t.trim().is_empty()).then_some(t)
        })
        .await;
        assert_has(&shown, "This log was deleted by the janitor");
        assert!(!shown.contains("nsGlobalWindow"), "{shown}");
        c.close().await.expect("close the browser");
    });
    assert_eq!(master.stop(), Some(0));
}

/// The jobs a push page shows, as `[platform, builder, state, symbol]`.
async fn jobs_shown(c: &Client, push: &str) -> Vec<[String; 4]> {
    let v = js(
        c,
        &format!(
            "return [...document.querySelectorAll(\"{push} .prow\")].flatMap(r => \
             [...r.querySelectorAll('.job')].map(a => [r.dataset.platform, a.dataset.builder, a.dataset.state, a.textContent]));"
        ),
    )
    .await;
    serde_json::from_value(v).unwrap_or_default()
}

/// The Mozilla quickstart's push page in Chromium: the branches with
/// their latest state, a push's changesets and a row per platform with a
/// `B` per build, a failed job's panel with the compiler's error, the
/// filters kept in the URL, a branch switch, a new push arriving live,
/// and the page on a phone.
#[test]
fn the_mozilla_push_page_shows_branches_platform_rows_and_why_a_job_failed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("mozilla");
    let mut master = Guard::spawn(
        common::quickstart(&dir)
            .arg("--mozilla")
            .env("FX_STANDIN_BUILD_SECONDS", "0.2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let log = common::capture(master.0.stderr.take().expect("stderr"));
    let text = || common::captured(&log);
    wait_until(
        Duration::from_secs(90),
        "four workers and four first polls",
        || {
            (text().matches("connected worker=").count() >= 4
                && text().matches("first poll").count() >= 4)
                .then_some(())
        },
    );
    let url = common::http_url_of(&text());
    let work = dir.join("work");
    let push = |branch: &str, message: &str| {
        let repo = work.join(branch);
        let file = repo.join("README");
        let mut body = std::fs::read_to_string(&file).expect("README");
        body.push_str("change\n");
        std::fs::write(&file, body).expect("write");
        run(&repo, "hg", &["commit", "-q", "-m", message]);
        run(&repo, "hg", &["push", "-q"]);
        run(&repo, "hg", &["log", "-r", ".", "-T", "{node}"])
    };
    let central = push("mozilla-central", "Bug 1 - make the browser start faster");
    let busted = push("try", "Bug 2 - bustage: a missing semicolon");

    let rt = common::runtime();
    rt.block_on(async {
        let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
        c.goto(&format!("{url}/#/?branch=try")).await.expect("open the page");
        let try_push = format!("article.push[data-revision='{busted}']");
        let platforms = ["linux", "linux64", "macosx64", "win32", "win64"];
        let jobs = eventually(Duration::from_secs(180), "try's five builds failed", || async {
            let jobs = jobs_shown(&c, &try_push).await;
            (jobs.len() == 5 && jobs.iter().all(|j| j[2] == "failure")).then_some(jobs)
        })
        .await;
        let rows: Vec<&str> = jobs.iter().map(|j| j[0].as_str()).collect();
        assert_eq!(rows, platforms, "a row per platform, in order");
        assert!(jobs.iter().all(|j| j[3] == "B" && j[1].ends_with(" try build")), "{jobs:?}");
        assert_has(&text_of(&c, &format!("{try_push} ul.csets")).await, "Bug 2 - bustage: a missing semicolon");
        assert_eq!(text_of(&c, &format!("{try_push} .pusher")).await, "kiln-test");
        assert_eq!(text_of(&c, &format!("{try_push} .count")).await, "5 of 5 done");
        // Both branches are listed, each with its newest push's state.
        let branches = eventually(Duration::from_secs(120), "both branches' states", || async {
            let v = js(&c, "return [...document.querySelectorAll('nav.branches a.branch')].map(a => [a.dataset.branch, a.dataset.state]);").await;
            let list: Vec<[String; 2]> = serde_json::from_value(v).unwrap_or_default();
            list.iter().any(|b| b[0] == "mozilla-central" && b[1] == "success").then_some(list)
        })
        .await;
        assert!(branches.contains(&["try".to_string(), "failure".to_string()]), "{branches:?}");
        js(&c, "window.kilnTestMark = 'same page'; return null;").await;

        // A failed job's panel: what failed and the lines that say why.
        c.find(Locator::Css(&format!("{try_push} .prow[data-platform='linux64'] .job")))
            .await
            .expect("linux64's job")
            .click()
            .await
            .expect("click");
        let lines = eventually(Duration::from_secs(30), "the failing lines", || async {
            let t = c.find(Locator::Css("#panel pre.faillines")).await.ok()?.text().await.ok()?;
            (!t.is_empty()).then_some(t)
        })
        .await;
        assert_has(&lines, "error: use of undeclared identifier 'mBustage'");
        let panel = text_of(&c, "#panel").await;
        assert_has(&panel, "Linux x86-64 try build");
        assert_has(&panel, "Step run_script: failure");
        assert_has(&panel, "bld-linux64-ec2-stage-00");
        c.find(Locator::Css("#panel .logs a[href^='#/builds/']")).await.expect("a link to the full log");
        screenshot(&c, "push-page.png").await;
        // The URL names the job: the same link shows the same panel.
        let here = js(&c, "return location.href;").await.as_str().expect("href").to_string();
        assert_has(&here, "job=b");
        c.goto(&format!("{url}/#/workers")).await.expect("away");
        c.goto(&here).await.expect("back by the link");
        eventually(Duration::from_secs(30), "the panel again", || async {
            let t = c.find(Locator::Css("#panel pre.faillines")).await.ok()?.text().await.ok()?;
            t.contains("mBustage").then_some(())
        })
        .await;
        js(&c, "window.kilnTestMark = 'same page'; return null;").await;

        // Another branch, by its link: mozilla-central built green.
        c.find(Locator::Css("nav.branches a.branch[data-branch='mozilla-central']"))
            .await
            .expect("mozilla-central's link")
            .click()
            .await
            .expect("click");
        let central_push = format!("article.push[data-revision='{central}']");
        let jobs = eventually(Duration::from_secs(60), "mozilla-central's five green builds", || async {
            let jobs = jobs_shown(&c, &central_push).await;
            (jobs.len() == 5 && jobs.iter().all(|j| j[2] == "success")).then_some(jobs)
        })
        .await;
        let rows: Vec<&str> = jobs.iter().map(|j| j[0].as_str()).collect();
        assert_eq!(rows, platforms);
        // Failures only: nothing of mozilla-central's is shown; the URL says so.
        c.find(Locator::Css("#failures")).await.expect("the filter").click().await.expect("click");
        eventually(Duration::from_secs(10), "no jobs shown", || async {
            jobs_shown(&c, &central_push).await.is_empty().then_some(())
        })
        .await;
        assert_has(&text_of(&c, &format!("{central_push} .nojobs")).await, "No jobs match");
        assert_has(&js(&c, "return location.hash;").await.to_string(), "failures=1");
        c.find(Locator::Css("#failures")).await.expect("the filter").click().await.expect("click");
        // A text filter on the builder's name.
        c.find(Locator::Css("#filter")).await.expect("the text filter").send_keys("WINNT").await.expect("type");
        let windows = eventually(Duration::from_secs(10), "the Windows jobs only", || async {
            let jobs = jobs_shown(&c, &central_push).await;
            (jobs.len() == 2).then_some(jobs)
        })
        .await;
        assert!(windows.iter().all(|j| j[1].starts_with("WINNT")), "{windows:?}");
        assert_has(&js(&c, "return location.hash;").await.to_string(), "filter=WINNT");
        c.find(Locator::Css("#filter")).await.expect("the text filter").clear().await.expect("clear");
        js(&c, "document.getElementById('filter').dispatchEvent(new Event('input')); return null;").await;

        // A new push shows up and builds without a reload.
        let second = push("mozilla-central", "Bug 3 - a second push");
        let second_push = format!("article.push[data-revision='{second}']");
        eventually(Duration::from_secs(120), "the second push, built", || async {
            let jobs = jobs_shown(&c, &second_push).await;
            (jobs.len() == 5 && jobs.iter().all(|j| j[2] == "success")).then_some(())
        })
        .await;
        assert_eq!(
            js(&c, "return window.kilnTestMark || null;").await,
            serde_json::json!("same page"),
            "the page changed without a reload"
        );
        let order = js(&c, "return [...document.querySelectorAll('article.push')].map(a => a.dataset.revision);").await;
        assert_eq!(order, serde_json::json!([second, central]), "newest first");

        // On a phone: no sideways scrolling; the panel opens over the pushes.
        c.set_window_size(390, 844).await.expect("resize");
        c.goto(&format!("{url}/#/?branch=try")).await.expect("try");
        eventually(Duration::from_secs(30), "try on a phone", || async {
            (jobs_shown(&c, &try_push).await.len() == 5).then_some(())
        })
        .await;
        c.find(Locator::Css(&format!("{try_push} .prow[data-platform='win32'] .job")))
            .await
            .expect("win32's job")
            .click()
            .await
            .expect("click");
        eventually(Duration::from_secs(30), "the panel on a phone", || async {
            let t = c.find(Locator::Css("#panel pre.faillines")).await.ok()?.text().await.ok()?;
            t.contains("mBustage").then_some(())
        })
        .await;
        let overflow = js(&c, "return document.documentElement.scrollWidth <= window.innerWidth + 1;").await;
        assert_eq!(overflow, serde_json::json!(true), "the page itself does not scroll sideways");
        screenshot(&c, "push-page-phone.png").await;
        c.close().await.expect("close the browser");
    });
    drop(master);
}

/// Rebuilding from a job's panel: offered to a user `www.authz` allows
/// (signed in through the page's form), who gets a new job in the same
/// push; not offered to an anonymous visitor, whom the API refuses.
#[test]
fn a_signed_in_user_may_rebuild_from_the_panel_and_an_anonymous_one_may_not() {
    use common::workers::{KilnWorker, Script, TestWorker as _, TRUE};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(TRUE)
        .worker("w1", "pw-one")
        .builder("compile", &["w1"], "")
        .www(
            r#"users: #{ rel: #{ password: secret("pw-rel"), roles: ["releng"] } },
               authz: #{ rebuild: ["releng"], force: ["releng"] }"#,
        )
        .secret("pw-rel", "sesame")
        .write(tmp.path());
    let master = common::Master::start(&dir);
    let url = master.http_url();
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let (code, body) = common::http(
        "POST",
        &format!("{url}/api/v2/forceschedulers/force"),
        Some(("rel", "sesame")),
        &[],
        common::Body::Json(
            serde_json::json!({ "method": "force", "params": { "builderNames": ["compile"], "revision": "abc123" } }),
        ),
    );
    assert_eq!(code, 200, "{body}");
    let rt = common::runtime();
    rt.block_on(async {
        let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
        c.goto(&format!("{url}/#/")).await.expect("open the page");
        let job = "article.push[data-revision='abc123'] .job";
        eventually(Duration::from_secs(60), "the forced build done", || async {
            let v = js(&c, &format!("return [...document.querySelectorAll(\"{job}\")].map(a => a.dataset.state);")).await;
            (v == serde_json::json!(["success"])).then_some(())
        })
        .await;
        c.find(Locator::Css(job)).await.expect("the job").click().await.expect("click");
        let panel = eventually(Duration::from_secs(30), "the panel", || async {
            let t = c.find(Locator::Css("#panel")).await.ok()?.text().await.ok()?;
            t.contains("compile").then_some(t)
        })
        .await;
        // Anonymous: no button, and the API says no.
        assert_has(&panel, "Sign in to rebuild.");
        assert!(c.find(Locator::Css("#rebuild")).await.is_err(), "no Rebuild button");
        let buildid = js(&c, &format!("return document.querySelector(\"{job}\").dataset.buildid;")).await;
        let buildid = buildid.as_str().expect("buildid").to_string();
        let refused = format!("{url}/api/v2/builds/{buildid}");
        let (code, _) = tokio::task::spawn_blocking(move || {
            common::http(
                "POST",
                &refused,
                None,
                &[("X-Requested-With", "kiln")],
                common::Body::Json(serde_json::json!({ "method": "rebuild" })),
            )
        })
        .await
        .expect("the API call");
        assert_eq!(code, 401, "an anonymous rebuild is refused");

        // Signed in as rel: the button, and a second job in the push.
        c.find(Locator::Id("signin")).await.expect("Sign in").click().await.expect("click");
        c.find(Locator::Css("form.signin [name=user]")).await.expect("user").send_keys("rel").await.expect("type");
        c.find(Locator::Css("form.signin [name=password]")).await.expect("password").send_keys("wrong").await.expect("type");
        c.find(Locator::Css("form.signin button")).await.expect("submit").click().await.expect("click");
        eventually(Duration::from_secs(10), "a wrong password said so", || async {
            let t = c.find(Locator::Css("form.signin .error")).await.ok()?.text().await.ok()?;
            t.contains("wrong").then_some(())
        })
        .await;
        let pw = c.find(Locator::Css("form.signin [name=password]")).await.expect("password");
        pw.clear().await.expect("clear");
        pw.send_keys("sesame").await.expect("type");
        c.find(Locator::Css("form.signin button")).await.expect("submit").click().await.expect("click");
        eventually(Duration::from_secs(10), "signed in", || async {
            let t = c.find(Locator::Css("#who")).await.ok()?.text().await.ok()?;
            t.contains("rel").then_some(())
        })
        .await;
        let rebuild = eventually(Duration::from_secs(30), "the Rebuild button", || async {
            c.find(Locator::Id("rebuild")).await.ok()
        })
        .await;
        rebuild.click().await.expect("rebuild");
        eventually(Duration::from_secs(60), "two green jobs in the push", || async {
            let v = js(&c, &format!("return [...document.querySelectorAll(\"{job}\")].map(a => a.dataset.state);")).await;
            (v == serde_json::json!(["success", "success"])).then_some(())
        })
        .await;
        assert_has(&text_of(&c, "#panel .msg").await, "rebuild requested");
        c.close().await.expect("close the browser");
    });
    let reasons = common::http_get(&format!("{url}/api/v2/buildsets"));
    assert_has(&reasons, &format!("rebuild of build {} (by rel)", 1));
}

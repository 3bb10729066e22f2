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

        let row = format!("tr[data-revision='{rev}']");
        eventually(Duration::from_secs(60), "the push's row", || async {
            c.find(Locator::Css(&row)).await.ok()
        })
        .await;
        let cells = format!("{row} td.cell[data-state]");
        let states = eventually(Duration::from_secs(120), "both builds green", || async {
            let v = js(&c, &format!(
                "return [...document.querySelectorAll(\"{cells}\")].map(td => [td.dataset.builder, td.dataset.state, td.dataset.results || '']);"
            ))
            .await;
            let list = v.as_array().cloned().unwrap_or_default();
            (list.len() == 2 && list.iter().all(|x| x[1] == "done" && x[2] == "0")).then_some(list)
        })
        .await;
        assert_eq!(states.len(), 2, "{states:?}");
        assert_eq!(
            js(&c, "return window.kilnTestMark || null;").await,
            serde_json::json!("same page"),
            "the grid changed without a reload"
        );
        // The commit message is shown as text, never as markup.
        let comments = text_of(&c, &format!("{row} .comments")).await;
        assert_has(&comments, "Bug 4242 - add the feature <b>bold</b>");
        let author = text_of(&c, &format!("{row} td.push b")).await;
        assert_eq!(author, "Dee Veloper");
        screenshot(&c, "web-grid.png").await;

        // Open the `build` builder's build of this push, then its log.
        c.find(Locator::Css(&format!("{row} td.cell[data-builder='build'] a")))
            .await
            .expect("the cell's link")
            .click()
            .await
            .expect("click");
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
        c.goto(&format!("{url}/#/")).await.expect("grid");
        let row2 = format!("tr[data-revision='{rev2}']");
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
        // A phone-sized window still shows the grid, scrolled sideways.
        c.set_window_size(390, 844).await.expect("resize");
        c.goto(&format!("{url}/#/")).await.expect("grid");
        eventually(Duration::from_secs(30), "the grid on a phone", || async {
            c.find(Locator::Css(&row)).await.ok()
        })
        .await;
        let overflow = js(&c, "return document.documentElement.scrollWidth <= window.innerWidth + 1;").await;
        assert_eq!(overflow, serde_json::json!(true), "the page itself does not scroll sideways");
        screenshot(&c, "web-grid-phone.png").await;
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

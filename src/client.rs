//! Talking to a running master: every command that asks a master for
//! something goes through here. Over HTTP (`kiln force`, `kiln
//! sendchange`, the REPL's live state) with one client; through the pid
//! file and a signal (`kiln stop`, `kiln reconfig`), which work without
//! the master's HTTP port.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::master::{PidInfo, PID_FILE};
use crate::store::{Store, Target};

/// How long one HTTP call to a master may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running master's HTTP API, as a command line sees it.
pub struct Client {
    base: String,
    auth: Option<(String, String)>,
    http: reqwest::blocking::Client,
}

/// A master's answer: its status and body, read whole.
pub struct Answer {
    url: String,
    status: reqwest::StatusCode,
    body: String,
}

impl Client {
    /// A client for the master at `base` (`http://host:port`), with
    /// `user:password` for Basic auth when given.
    ///
    /// An `https` master's certificate must come from a public authority,
    /// or from one in the PEM file `SSL_CERT_FILE` names (a private
    /// authority, or the master's own self-signed certificate).
    pub fn new(base: &str, auth: Option<&str>) -> anyhow::Result<Client> {
        let mut builder = reqwest::blocking::Client::builder().timeout(TIMEOUT);
        if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
            let pem = std::fs::read(&path).with_context(|| {
                format!("cannot read SSL_CERT_FILE {}", Path::new(&path).display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "SSL_CERT_FILE {} is not PEM certificates",
                    Path::new(&path).display()
                )
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().context("cannot start an HTTP client")?;
        let auth = auth.map(|up| {
            let (u, p) = up.split_once(':').unwrap_or((up, ""));
            (u.to_string(), p.to_string())
        });
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            auth,
            http,
        })
    }

    /// Sends what `build` makes of the client and the full address of
    /// `path`.
    fn send(
        &self,
        path: &str,
        build: impl FnOnce(&reqwest::blocking::Client, &str) -> reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let req = build(&self.http, &url);
        let req = match &self.auth {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        };
        let resp = req
            .send()
            .with_context(|| format!("cannot reach the master at {url}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .with_context(|| format!("cannot read the master's answer from {url}"))?;
        Ok(Answer { url, status, body })
    }

    /// GET `path` (from `/`).
    pub fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(path, |c, url| c.get(url))
    }

    /// POST a JSON body to `path`.
    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Answer> {
        self.send(path, |c, url| c.post(url).json(body))
    }

    /// POST a form to `path`.
    pub fn post_form(&self, path: &str, form: &[(&str, String)]) -> anyhow::Result<Answer> {
        self.send(path, |c, url| c.post(url).form(form))
    }
}

impl Answer {
    /// The body as JSON, when it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// The JSON of a successful answer; otherwise an error with the
    /// status and the master's reason (Buildbot's `error` or
    /// `error.message`, else the body), after `refused`.
    pub fn ok_json(self, refused: &str) -> anyhow::Result<Value> {
        let v = self.json();
        if !self.status.is_success() {
            let why = v
                .as_ref()
                .and_then(|v| v["error"]["message"].as_str().or(v["error"].as_str()))
                .map(str::to_string)
                .unwrap_or_else(|| match self.body.trim() {
                    "" => "no reason given".to_string(),
                    body => body.to_string(),
                });
            bail!("{refused} ({}): {why}", self.status);
        }
        v.with_context(|| format!("{} did not answer JSON", self.url))
    }
}

/// What `kiln force` asks for.
pub struct Force<'a> {
    pub builder: &'a str,
    /// The ForceScheduler; `None` finds the one that builds `builder`.
    pub scheduler: Option<&'a str>,
    pub branch: Option<&'a str>,
    pub revision: Option<&'a str>,
    pub repository: Option<&'a str>,
    pub project: Option<&'a str>,
    pub reason: &'a str,
    pub properties: serde_json::Map<String, Value>,
}

impl Client {
    /// Forces a build through a ForceScheduler (Buildbot's JSON-RPC
    /// `force`): the new buildset's id and its requests.
    pub fn force(&self, f: Force<'_>) -> anyhow::Result<(i64, String)> {
        let scheduler = match f.scheduler {
            Some(s) => s.to_string(),
            None => {
                let list = self
                    .get("/api/v2/forceschedulers")?
                    .ok_json("the master refused")?;
                let found = list["forceschedulers"].as_array().and_then(|l| {
                    l.iter().find(|s| {
                        s["builder_names"]
                            .as_array()
                            .is_some_and(|b| b.iter().any(|n| n.as_str() == Some(f.builder)))
                    })
                });
                match found.and_then(|s| s["name"].as_str()) {
                    Some(n) => n.to_string(),
                    None => bail!("no ForceScheduler of the master builds `{}`", f.builder),
                }
            }
        };
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": 1,
            "method": "force",
            "params": {
                "builderNames": [f.builder],
                "branch": f.branch,
                "revision": f.revision,
                "repository": f.repository,
                "project": f.project,
                "reason": f.reason,
                "properties": f.properties,
            },
        });
        let v = self
            .post_json(&format!("/api/v2/forceschedulers/{scheduler}"), &body)?
            .ok_json("the master refused")?;
        let bsid = v["result"][0]
            .as_i64()
            .context("the master's answer has no buildset id")?;
        Ok((bsid, v["result"][1].to_string()))
    }

    /// Sends a change to the base change hook (`buildbot sendchange`): the
    /// ids of the stored changes.
    pub fn sendchange(&self, form: &[(&str, String)]) -> anyhow::Result<String> {
        let v = self
            .post_form("/change_hook/base", form)?
            .ok_json("the master refused the change")?;
        Ok(v["changeids"].to_string())
    }
}

/// `kiln stop`: SIGTERM to the master of `dir`, then wait until it is gone.
pub fn stop(dir: &Path, wait: Duration) -> anyhow::Result<()> {
    let Some(master) = PidInfo::read(dir) else {
        bail!("no master is running in {} (no {PID_FILE})", dir.display());
    };
    let pid = master.pid;
    if !master.is_running() {
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        bail!(
            "no master is running in {} (pid {pid} from {PID_FILE} is gone; removed the stale file)",
            dir.display()
        );
    }
    master.signal(libc::SIGTERM)?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if !master.is_running() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the master (pid {pid}) did not stop within {} s",
        wait.as_secs()
    )
}

/// `kiln reconfig`: SIGHUP to the master of `dir`, then its record of that
/// reload, once stored.
///
/// The pid file names the master's database; `postgres` gives the whole
/// address (with its password) of a PostgreSQL one.
pub fn reconfig(
    dir: &Path,
    wait: Duration,
    postgres: impl FnOnce() -> anyhow::Result<Target>,
) -> anyhow::Result<crate::store::reloads::Reload> {
    let Some(master) = PidInfo::read(dir).filter(PidInfo::is_running) else {
        bail!(
            "no master is running in {} (no live pid in {PID_FILE}); `kiln start {}` starts one",
            dir.display(),
            dir.display()
        );
    };
    let pid = master.pid;
    let Some(db) = &master.db else {
        bail!(
            "{} does not name the master's database (a master older than this kiln?); send SIGHUP to pid {pid} to reload",
            dir.join(PID_FILE).display()
        );
    };
    let target = if db.starts_with("postgres") {
        postgres()?
    } else {
        Target::Sqlite(db.into())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let store = Store::connect(&target).await?;
        let before = store.reloads(1).await?.first().map_or(0, |r| r.reloadid);
        master.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + wait;
        loop {
            let newer = store.reloads(20).await?;
            if let Some(r) = newer
                .into_iter()
                .filter(|r| r.reloadid > before && r.record.trigger == "SIGHUP")
                .min_by_key(|r| r.reloadid)
            {
                return Ok(r);
            }
            if !master.is_running() {
                bail!("the master (pid {pid}) stopped before reloading");
            }
            if Instant::now() > deadline {
                bail!(
                    "the master (pid {pid}) did not finish reloading within {} s",
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

//! A throwaway PostgreSQL server for tests.
//!
//! [`PgServer::start`] runs Debian's `postgresql` binaries on a copy of a
//! cluster made once by `initdb` (cached in the system temp dir, so that a
//! test pays for a copy and a start, about a third of a second, rather than
//! for `initdb`), in a temp dir, listening on 127.0.0.1 and a free port,
//! its socket in the temp dir. Dropping the server stops it
//! (`pg_ctl stop -m immediate`) and removes its files.
//!
//! `initdb` and `postgres` refuse to run as root: as root, every server
//! command runs through `runuser -u postgres --`, on files owned by the
//! `postgres` user.
//!
//! The superuser is `kiln` with the password [`PASSWORD`] over TCP
//! (scram-sha-256) and no password over the socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The superuser's password over TCP.
pub const PASSWORD: &str = "kiln-test-password";

/// The superuser's name.
pub const USER: &str = "kiln";

/// A running PostgreSQL server; stopped when dropped.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    stopped: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server program as the user that may run it.
fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) -> Result<Output, String> {
    let out = c.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// The newest `/usr/lib/postgresql/N/bin` that has `initdb`.
fn find_bin() -> Result<PathBuf, String> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!(
                "no PostgreSQL server (/usr/lib/postgresql: {e}); install Debian's postgresql package \
                 (bash .ci/test does)"
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".to_string())
}

fn chown_postgres(path: &Path) -> Result<(), String> {
    if is_root() {
        let mut c = Command::new("chown");
        c.args(["-R", "postgres:postgres"]).arg(path);
        run(c, "chown")?;
    }
    Ok(())
}

/// A cluster made by `initdb` once per PostgreSQL version and user, copied
/// by every server.
fn template(bin: &Path) -> Result<PathBuf, String> {
    static TEMPLATE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut t = TEMPLATE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = &*t {
        return Ok(p.clone());
    }
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("pg");
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let root = std::env::temp_dir().join(format!("kiln-testpg-{version}-{uid}"));
    let data = root.join("data");
    if !data.join("PG_VERSION").exists() {
        let work = tempfile::Builder::new()
            .prefix("kiln-testpg-initdb")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let pwfile = work.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).map_err(|e| format!("password file: {e}"))?;
        chown_postgres(work.path())?;
        let mut c = server_command(&bin.join("initdb"));
        c.arg("-D")
            .arg(work.path().join("data"))
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["--no-locale", "-E", "UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(c, "initdb")?;
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        // Another test process may have made it meanwhile: either copy is
        // a whole cluster.
        if std::fs::rename(work.path().join("data"), &data).is_err() && !data.exists() {
            return Err(format!(
                "cannot keep the template cluster at {}",
                data.display()
            ));
        }
    }
    *t = Some(data.clone());
    Ok(data)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

impl PgServer {
    /// Starts a server; panics with what is missing when it cannot.
    pub fn start() -> PgServer {
        match PgServer::try_start() {
            Ok(s) => s,
            Err(e) => panic!("cannot start a test PostgreSQL server: {e}"),
        }
    }

    pub fn try_start() -> Result<PgServer, String> {
        let bin = find_bin()?;
        let template = template(&bin)?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-pg")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut c = Command::new("cp");
        c.arg("-a").arg(&template).arg(dir.path().join("data"));
        run(c, "cp")?;
        chown_postgres(dir.path())?;
        // The port is free when asked; another process may take it before
        // the server binds it, so a failed start tries another.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut c = server_command(&bin.join("pg_ctl"));
            c.arg("-D")
                .arg(dir.path().join("data"))
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-w", "-t", "30", "-o"])
                .arg(format!(
                    "-h 127.0.0.1 -p {port} -k {} -F -c max_connections=200",
                    dir.path().display()
                ))
                .arg("start");
            match run(c, "pg_ctl start") {
                Ok(_) => {
                    return Ok(PgServer {
                        bin,
                        dir,
                        port,
                        stopped: false,
                    })
                }
                Err(e) => {
                    let log =
                        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                    last = format!("{e}\n{log}");
                }
            }
        }
        Err(last)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser, password included.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// The URL of database `db` without a password.
    pub fn url_without_password(&self, db: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL through `psql` over the socket; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut c = Command::new(self.bin.join("psql"));
        c.arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", db])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        match run(c, "psql") {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => panic!("{e}"),
        }
    }

    /// Makes an empty database; its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Stops the server now (as a crash would: no checkpoint).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let mut c = server_command(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.path().join("data")).args([
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "stop",
        ]);
        let _ = c.output();
    }

    /// Starts a stopped server again, on the same port.
    pub fn restart(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = server_command(&self.bin.join("pg_ctl"));
            c.arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "30", "-o"])
                .arg(format!(
                    "-h 127.0.0.1 -p {} -k {} -F -c max_connections=200",
                    self.port,
                    self.dir.path().display()
                ))
                .arg("start");
            match run(c, "pg_ctl start") {
                Ok(_) => {
                    self.stopped = false;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Turns TLS on with this certificate and key (PEM), as
    /// `server.crt` and `server.key` in the data dir; plain connections
    /// are still accepted.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.path().join("data");
        std::fs::write(data.join("server.crt"), cert_pem)
            .map_err(|e| format!("server.crt: {e}"))?;
        let key = data.join("server.key");
        std::fs::write(&key, key_pem).map_err(|e| format!("server.key: {e}"))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("server.key: {e}"))?;
        chown_postgres(&data)?;
        self.psql("postgres", "ALTER SYSTEM SET ssl = on");
        self.psql("postgres", "SELECT pg_reload_conf()");
        // The reload is asynchronous: wait until the server says it is on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.psql("postgres", "SHOW ssl").trim() != "on" {
            if Instant::now() > deadline {
                return Err(format!("TLS did not come on:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

//! The entry script's value (the BuildmasterConfig map) as a typed
//! [`MasterConfig`]. Unknown keys and wrong types are errors here too.

use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map};

use super::kwargs::{type_name, Kwargs, ScriptError, ScriptResult};
use super::vocab::builder_config;
use super::{errors, LoadState};
use crate::config::*;
use crate::diagnostics::Diagnostic;

/// Where the worker port listens unless its port string says: workers are
/// other machines, so every interface, as Buildbot does.
const EVERY_INTERFACE: &str = "0.0.0.0";

pub fn master_config(
    value: Dynamic,
    state: &Arc<LoadState>,
    entry: &str,
) -> Result<MasterConfig, Vec<Diagnostic>> {
    let value = value.flatten();
    if !value.is_map() {
        return Err(vec![Diagnostic::error(format!(
            "the entry script must end with the BuildmasterConfig map as its last expression, but it ends with a value of type {}",
            type_name(&value)
        ))
        .with_help(Some("end master.rhai with `c` (the map) on its own line".into()))]);
    }
    let map = value.cast::<Map>();
    build(map, state).map_err(|e| vec![errors::diagnose(&e, entry, &state.limits)])
}

fn list_of(v: Option<Dynamic>) -> Array {
    match v {
        None => Array::new(),
        Some(v) if v.is_array() => v.cast::<Array>().into_iter().map(|x| x.flatten()).collect(),
        Some(v) => vec![v],
    }
}

fn items<T: Clone + Send + Sync + 'static>(
    v: Option<Dynamic>,
    key: &str,
    expected: &str,
) -> ScriptResult<Vec<T>> {
    list_of(v)
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            if x.is::<T>() {
                return Ok(x.cast::<T>());
            }
            let t = type_name(&x);
            x.try_cast::<T>().ok_or_else(|| {
                ScriptError::new(format!("item {i} of `{key}` is a {t}, not {expected}"))
                    .focus(key.to_string())
                    .into_err()
            })
        })
        .collect()
}

fn build(map: Map, state: &Arc<LoadState>) -> ScriptResult<MasterConfig> {
    let mut kw = Kwargs::new("BuildmasterConfig", map, None, state.clone());
    let title = kw.str("title")?.unwrap_or_else(|| "kiln".into());
    let title_url = kw.str("titleURL")?.unwrap_or_default();
    let buildbot_url = kw
        .str("buildbotURL")?
        .unwrap_or_else(|| "http://localhost:8010/".into());
    let db = db_config(kw.raw("db"))?;
    let protocols = protocols(kw.raw("protocols"))?;
    let www = match kw.raw("www") {
        None => None,
        Some(v) => Some(www(v, state)?),
    };
    let properties = kw.properties("properties")?;
    let workers = items::<Worker>(
        kw.take_legacy("workers", "slaves"),
        "workers",
        "a Worker(...)",
    )?;
    let mut change_source = Vec::new();
    for (i, x) in list_of(kw.raw("change_source")).into_iter().enumerate() {
        let t = type_name(&x);
        if x.is::<HgPoller>() {
            change_source.push(ChangeSource::HgPoller(x.cast()));
        } else if x.is::<GitPoller>() {
            change_source.push(ChangeSource::GitPoller(x.cast()));
        } else {
            return Err(ScriptError::new(format!(
                "item {i} of `change_source` is a {t}, not HgPoller(...) or GitPoller(...)"
            ))
            .focus("change_source")
            .into_err());
        }
    }
    let schedulers =
        items::<Arc<SchedulerConfig>>(kw.raw("schedulers"), "schedulers", "a scheduler")?;
    let mut builders = Vec::new();
    for (i, x) in list_of(kw.raw("builders")).into_iter().enumerate() {
        let t = type_name(&x);
        if x.is::<Arc<BuilderConfig>>() {
            builders.push(x.cast::<Arc<BuilderConfig>>());
        } else if let Some(m) = x.try_cast::<Map>() {
            // Buildbot 0.8 builders were plain dicts, as the seed's are.
            let mut bkw = Kwargs::new("builder", m, None, state.clone());
            let b = builder_config(&mut bkw)?;
            bkw.finish()?;
            builders.push(Arc::new(b));
        } else {
            return Err(ScriptError::new(format!(
                "item {i} of `builders` is a {t}, not BuilderConfig(...) or a builder map"
            ))
            .focus("builders")
            .into_err());
        }
    }
    let status = items::<StatusTarget>(
        kw.raw("status"),
        "status",
        "a status target such as QueuedCommandHandler(...)",
    )?;
    let prioritize_builders = kw.callback("prioritizeBuilders")?;
    let collapse_requests = super::vocab::bool_or_callback(&mut kw, "collapseRequests")?
        .unwrap_or(BoolOrCallback::Enabled(true));
    let log_max_size = kw.uint("logMaxSize")?.unwrap_or(DEFAULT_LOG_MAX_SIZE);
    let multi_master = multi_master(kw.raw("multiMaster"))?;
    let master_name = kw.str("masterName")?;
    if master_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(ScriptError::new("`masterName` must not be empty")
            .focus("masterName")
            .into_err());
    }
    let latent_start_concurrency =
        match kw.uint("latentStartConcurrency")? {
            None => 4,
            Some(0) => return Err(ScriptError::new(
                "`latentStartConcurrency` must be at least 1 (latent workers could never start)",
            )
            .focus("latentStartConcurrency")
            .into_err()),
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
    let log_compression = match kw.str("logCompressionMethod")? {
        None => LogCompression::default(),
        Some(name) => match LogCompression::ALL.iter().find(|(n, _)| *n == name) {
            Some((_, m)) => *m,
            None => {
                return Err(ScriptError::new(format!(
                    "`logCompressionMethod` is \"raw\", \"gz\", \"bz2\", \"lz4\" or \"zstd\" (the default), not {name:?}"
                ))
                .focus("logCompressionMethod")
                .into_err())
            }
        },
    };
    let janitor = match &items::<Janitor>(
        kw.raw("configurators"),
        "configurators",
        "JanitorConfigurator(...)",
    )?[..]
    {
        [] => None,
        [one] => Some(one.clone()),
        [_, ..] => {
            return Err(ScriptError::new(
                "`configurators` has more than one JanitorConfigurator; one says when and what to delete",
            )
            .focus("configurators")
            .into_err())
        }
    };
    // Buildbot's usage reporting: kiln reports nothing, whatever it says.
    let _ = kw.raw("buildbotNetUsageData");
    kw.finish()?;
    Ok(MasterConfig {
        title,
        title_url,
        buildbot_url,
        db,
        protocols,
        www,
        properties,
        workers,
        change_source,
        schedulers,
        builders,
        status,
        prioritize_builders,
        collapse_requests,
        log_max_size,
        multi_master,
        master_name,
        latent_start_concurrency,
        log_compression,
        janitor,
    })
}

/// `multiMaster: true`, or `#{ heartbeat: SECONDS, dead_after: SECONDS }`.
fn multi_master(v: Option<Dynamic>) -> ScriptResult<Option<MultiMaster>> {
    let Some(v) = v else { return Ok(None) };
    if let Some(on) = v.clone().try_cast::<bool>() {
        return Ok(on.then(MultiMaster::default));
    }
    let m = sub_map(v, "multiMaster")?;
    strict(&m, "multiMaster", &["heartbeat", "dead_after"])?;
    let mut mm = MultiMaster::default();
    for (key, slot) in [
        ("heartbeat", &mut mm.heartbeat),
        ("dead_after", &mut mm.dead_after),
    ] {
        if let Some(x) = m.get(key) {
            *slot = x
                .as_int()
                .ok()
                .and_then(|i| u64::try_from(i).ok())
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    ScriptError::new(format!(
                        "`multiMaster.{key}` must be a whole number of seconds above 0"
                    ))
                    .focus(key)
                    .into_err()
                })?;
        }
    }
    if mm.dead_after <= mm.heartbeat {
        return Err(ScriptError::new(format!(
            "`multiMaster.dead_after` ({} s) must be longer than `heartbeat` ({} s): \
             a live master would be declared dead between two of its heartbeats",
            mm.dead_after, mm.heartbeat
        ))
        .focus("dead_after")
        .into_err());
    }
    Ok(Some(mm))
}

/// The most one step log keeps unless `logMaxSize` says otherwise.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 64 << 20;

fn sub_map(v: Dynamic, key: &str) -> ScriptResult<Map> {
    let t = type_name(&v);
    v.try_cast::<Map>().ok_or_else(|| {
        ScriptError::new(format!("`{key}` must be a map, got {t}"))
            .focus(key.to_string())
            .into_err()
    })
}

fn strict(map: &Map, key: &str, known: &[&str]) -> ScriptResult<()> {
    for k in map.keys() {
        if !known.contains(&k.as_str()) {
            let mut msg = format!("unknown key `{k}` in `{key}`");
            if let Some(near) = crate::suggest::nearest(k, known.iter().copied()) {
                msg = format!("{msg}; did you mean `{near}`?");
            }
            return Err(ScriptError::new(msg)
                .help(format!("`{key}` takes: {}", known.join(", ")))
                .focus(k.to_string())
                .into_err());
        }
    }
    Ok(())
}

fn db_config(v: Option<Dynamic>) -> ScriptResult<DbConfig> {
    const DEFAULT: &str = "sqlite:///state.sqlite";
    let Some(v) = v else {
        return Ok(DbConfig {
            db_url: DEFAULT.into(),
            password: None,
        });
    };
    let m = sub_map(v, "db")?;
    strict(&m, "db", &["db_url", "password"])?;
    let url = match m.get("db_url") {
        None => DEFAULT.to_string(),
        Some(u) => u.clone().into_string().map_err(|_| {
            ScriptError::new("`db.db_url` must be a string")
                .focus("db_url")
                .into_err()
        })?,
    };
    let password = match m.get("password") {
        None => None,
        Some(p) => Some(crate::script::kwargs::secret_of(p).ok_or_else(|| {
            ScriptError::new("`db.password` must be a string or secret(...)")
                .focus("password")
                .into_err()
        })?),
    };
    let db = DbConfig {
        db_url: url,
        password,
    };
    if !db.is_postgres() && !db.db_url.starts_with("sqlite://") {
        return Err(ScriptError::new(format!(
            "`db.db_url` {:?} is not supported",
            crate::diagnostics::redact_url(&db.db_url)
        ))
        .help(
            "write sqlite:///state.sqlite (relative to the master dir), sqlite:////absolute/path, \
             or postgresql://USER@HOST:PORT/DBNAME",
        )
        .focus("db_url")
        .into_err());
    }
    if db.password.is_some() && !db.is_postgres() {
        return Err(ScriptError::new(
            "`db.password` is for a PostgreSQL database; SQLite has none",
        )
        .focus("password")
        .into_err());
    }
    Ok(db)
}

/// A port: a number, or Twisted's port string (`"tcp:8010:interface=..."`,
/// `"ssl:8443:privateKey=key.pem:certKey=cert.pem"`) as Buildbot configs
/// write it.
fn listen_of(v: &Dynamic, key: &str) -> ScriptResult<Listen> {
    let bad = |why: String| {
        ScriptError::new(format!("`{key}`: {why}"))
            .help("write a port number, \"tcp:PORT:interface=ADDRESS\" or \"ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem\"")
            .focus("port")
            .into_err()
    };
    if let Ok(n) = v.as_int() {
        let port =
            u16::try_from(n).map_err(|_| bad("a port must be a number from 0 to 65535".into()))?;
        return Ok(Listen {
            port,
            interface: None,
            tls: None,
        });
    }
    let s = v
        .clone()
        .into_string()
        .map_err(|_| bad("must be a port number or a port string".into()))?;
    Listen::parse(&s).map_err(bad)
}

fn protocols(v: Option<Dynamic>) -> ScriptResult<ProtocolsConfig> {
    let Some(v) = v else {
        return Ok(ProtocolsConfig {
            msgpack_port: None,
            msgpack_interface: EVERY_INTERFACE.into(),
            msgpack_tls: None,
        });
    };
    let m = sub_map(v, "protocols")?;
    if m.contains_key("pb") {
        return Err(ScriptError::new("kiln's workers speak `msgpack_experimental_v7`, not `pb`")
            .help("write protocols: #{ msgpack_experimental_v7: #{ port: 9989 } } and create workers with --protocol msgpack_experimental_v7")
            .focus("pb")
            .into_err());
    }
    strict(&m, "protocols", &["msgpack_experimental_v7"])?;
    let listen = match m.get("msgpack_experimental_v7") {
        None => None,
        Some(p) => {
            let pm = sub_map(p.clone(), "msgpack_experimental_v7")?;
            strict(&pm, "msgpack_experimental_v7", &["port"])?;
            let port = pm.get("port").ok_or_else(|| {
                ScriptError::new("`protocols.msgpack_experimental_v7` needs `port`").into_err()
            })?;
            Some(listen_of(port, "protocols.msgpack_experimental_v7.port")?)
        }
    };
    Ok(ProtocolsConfig {
        msgpack_port: listen.as_ref().map(|l| l.port),
        msgpack_interface: listen
            .as_ref()
            .and_then(|l| l.interface.clone())
            .unwrap_or_else(|| EVERY_INTERFACE.into()),
        msgpack_tls: listen.and_then(|l| l.tls),
    })
}

fn www(v: Dynamic, state: &Arc<LoadState>) -> ScriptResult<WwwConfig> {
    let m = sub_map(v, "www")?;
    strict(
        &m,
        "www",
        &[
            "port",
            "host",
            "public_read",
            "users",
            "authz",
            "change_hook_dialects",
            "plugins",
        ],
    )?;
    let port_v = m.get("port").cloned().unwrap_or(Dynamic::from(8010_i64));
    let listen = listen_of(&port_v, "www.port")?;
    let host = match m.get("host") {
        Some(h) => h.clone().into_string().map_err(|_| {
            ScriptError::new("`www.host` must be a string")
                .focus("host")
                .into_err()
        })?,
        None => listen
            .interface
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into()),
    };
    let public_read = match m.get("public_read") {
        None => true,
        Some(b) => b.as_bool().map_err(|_| {
            ScriptError::new("`www.public_read` must be a bool")
                .focus("public_read")
                .into_err()
        })?,
    };
    let mut users = BTreeMap::new();
    if let Some(u) = m.get("users") {
        for (name, spec) in sub_map(u.clone(), "www.users")? {
            let mut kw = Kwargs::new("www user", sub_map(spec, "www.users")?, None, state.clone());
            let password = kw
                .secret("password")?
                .ok_or_else(|| kw.missing("password", "a string or secret(...)"))?;
            let roles = kw.str_list("roles")?.unwrap_or_default();
            kw.finish()?;
            users.insert(name.to_string(), WwwUser { password, roles });
        }
    }
    let mut authz = BTreeMap::new();
    if let Some(a) = m.get("authz") {
        let mut kw = Kwargs::new(
            "www.authz",
            sub_map(a.clone(), "www.authz")?,
            None,
            state.clone(),
        );
        for (action, _) in crate::config::WwwAction::ALL {
            if let Some(roles) = kw.str_list(action)? {
                authz.insert(action.to_string(), roles);
            }
        }
        kw.finish()?;
    }
    let mut change_hook_dialects = Vec::new();
    if let Some(d) = m.get("change_hook_dialects") {
        for (name, on) in sub_map(d.clone(), "www.change_hook_dialects")? {
            if name.as_str() != "base" {
                return Err(ScriptError::new(format!(
                    "change hook dialect `{name}` is not supported; kiln has `base`"
                ))
                .focus(name.to_string())
                .into_err());
            }
            if on.as_bool().unwrap_or(true) {
                change_hook_dialects.push(name.to_string());
            }
        }
    }
    Ok(WwwConfig {
        port: listen.port,
        host,
        tls: listen.tls,
        public_read,
        users,
        authz,
        change_hook_dialects,
    })
}

//! Who may read and write over HTTP.
//!
//! Users come from the config's `www.users` (passwords as `secret(...)`),
//! sent as HTTP Basic auth. Which roles may do what comes from `www.authz`
//! (`#{ force: ["developers"], reconfig: ["admins"] }`); an action it does
//! not name is open to every user. With no users configured, the master
//! trusts its own machine: writes are taken from loopback clients only.
//! Reads are public unless `www.public_read` is false; then they need a
//! user too.
//!
//! Writes are also refused when a browser sends them from another site
//! (`Origin` or `Sec-Fetch-Site` says so): a page elsewhere cannot use the
//! credentials or the loopback trust of someone who has the web page open.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::config::{WwwAction, WwwConfig, WwwUser};

/// The access rules in force (replaced by a reload).
#[derive(Clone, Debug, Default)]
pub struct Access {
    users: BTreeMap<String, WwwUser>,
    authz: BTreeMap<String, Vec<String>>,
    public_read: bool,
}

impl Access {
    pub fn of(www: Option<&WwwConfig>) -> Access {
        match www {
            Some(w) => Access {
                users: w.users.clone(),
                authz: w.authz.clone(),
                public_read: w.public_read,
            },
            None => Access {
                public_read: true,
                ..Access::default()
            },
        }
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq)]
pub enum Denied {
    /// No users are configured and the client is not on this machine.
    NotLocal,
    /// No valid user name and password were given.
    NeedsUser,
    /// The same, to the web page's own requests (`X-Requested-With`): no
    /// `WWW-Authenticate`, so that the browser does not ask in a dialog of
    /// its own; the page has its sign-in form.
    NeedsUserQuietly,
    /// The user has none of the roles the action needs.
    Role {
        user: String,
        action: WwwAction,
        roles: Vec<String>,
    },
    /// A browser sent it from another site.
    CrossSite(String),
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let forbidden =
            |msg: String| (StatusCode::FORBIDDEN, Json(json!({ "error": msg }))).into_response();
        match self {
            Denied::NotLocal => forbidden(
                "writes need a user: configure www.users, or connect from this machine".into(),
            ),
            Denied::NeedsUser => (
                StatusCode::UNAUTHORIZED,
                [("WWW-Authenticate", "Basic realm=\"kiln\"")],
                Json(json!({ "error": "a valid user name and password are needed" })),
            )
                .into_response(),
            Denied::Role {
                user,
                action,
                roles,
            } => forbidden(format!(
                "`{user}` may not {}: it needs one of the roles {}",
                action.name(),
                roles.join(", ")
            )),
            Denied::NeedsUserQuietly => (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": "a valid user name and password are needed" })),
            )
                .into_response(),
            Denied::CrossSite(from) => {
                forbidden(format!("a write from another site ({from}) is refused"))
            }
        }
    }
}

/// The user named by valid Basic credentials, if any; `Err` when
/// credentials were sent and are wrong.
fn user_of(access: &Access, headers: &HeaderMap) -> Result<Option<String>, Denied> {
    let Some(auth) = headers.get("authorization") else {
        return Ok(None);
    };
    let encoded = auth
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or(Denied::NeedsUser)?;
    let decoded = decode_base64(encoded.trim()).ok_or(Denied::NeedsUser)?;
    let (user, password) = decoded.split_once(':').ok_or(Denied::NeedsUser)?;
    match access.users.get(user) {
        Some(u) if constant_time_eq(u.password.expose().as_bytes(), password.as_bytes()) => {
            Ok(Some(user.to_string()))
        }
        _ => Err(Denied::NeedsUser),
    }
}

/// Whether the credentials a request carries name a user with that
/// password (false for malformed ones); `None` when there are no users
/// to check them against.
pub fn credentials_valid(access: &Access, headers: &HeaderMap) -> Option<bool> {
    (!access.users.is_empty()).then(|| matches!(user_of(access, headers), Ok(Some(_))))
}

/// Whether a browser says this request comes from a page of another site.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        if site == "cross-site" || site == "same-site" {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = header("origin")?;
    let host = header("host").unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    (origin == "null" || !origin_host.eq_ignore_ascii_case(host)).then(|| origin.to_string())
}

/// Who may do `action`: the user's name (empty for a trusted loopback
/// client when no users are configured), or why not.
pub fn writer(
    access: &Access,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: WwwAction,
) -> Result<String, Denied> {
    if let Some(from) = cross_site(headers) {
        return Err(Denied::CrossSite(from));
    }
    if access.users.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(String::new())
        } else {
            Err(Denied::NotLocal)
        };
    }
    let user = user_of(access, headers)?.ok_or(Denied::NeedsUser)?;
    if let Some(roles) = access.authz.get(action.name()) {
        let has = access
            .users
            .get(&user)
            .is_some_and(|u| u.roles.iter().any(|r| roles.contains(r)));
        if !has {
            return Err(Denied::Role {
                user,
                action,
                roles: roles.clone(),
            });
        }
    }
    Ok(user)
}

/// Who the caller is and which actions it may do, for the web page to
/// offer only the controls that would work: the user named by valid
/// credentials (none without them, or when no users are configured) and
/// the names of the allowed actions. `Err` when credentials were sent and
/// are wrong.
pub fn access_of(
    access: &Access,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(Option<String>, Vec<&'static str>), Denied> {
    let user = user_of(access, headers)?;
    let may = WwwAction::ALL
        .iter()
        .filter(|(_, a)| writer(access, headers, peer, *a).is_ok())
        .map(|(name, _)| *name)
        .collect();
    Ok((user, may))
}

/// Change hooks are open, as Buildbot's are (repository hooks post
/// without credentials), unless `www.authz` names `change`; a browser's
/// post from another site is refused either way.
pub fn hook(access: &Access, headers: &HeaderMap, peer: SocketAddr) -> Result<(), Denied> {
    if let Some(from) = cross_site(headers) {
        return Err(Denied::CrossSite(from));
    }
    if access.authz.contains_key(WwwAction::Change.name()) {
        writer(access, headers, peer, WwwAction::Change)?;
    }
    Ok(())
}

/// Whether a read is allowed: always when reads are public; otherwise for
/// a valid user, or a loopback client when no users are configured.
pub fn reader(access: &Access, headers: &HeaderMap, peer: SocketAddr) -> Result<(), Denied> {
    if access.public_read {
        return Ok(());
    }
    if access.users.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(Denied::NotLocal)
        };
    }
    user_of(access, headers)?.ok_or(Denied::NeedsUser)?;
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_base64(s: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn access(authz: &[(&str, &[&str])], public_read: bool) -> Access {
        let mut users = BTreeMap::new();
        users.insert(
            "ann".to_string(),
            WwwUser {
                password: Secret::literal("pw-ann"),
                roles: vec!["admins".into()],
            },
        );
        users.insert(
            "dev".to_string(),
            WwwUser {
                password: Secret::literal("pw-dev"),
                roles: vec!["developers".into()],
            },
        );
        Access {
            users,
            authz: authz
                .iter()
                .map(|(a, r)| (a.to_string(), r.iter().map(|s| s.to_string()).collect()))
                .collect(),
            public_read,
        }
    }

    fn basic(user: &str, pw: &str) -> HeaderMap {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(
            "authorization",
            format!("Basic {token}").parse().expect("header"),
        );
        h
    }

    const LOCAL: &str = "127.0.0.1:5000";
    const REMOTE: &str = "10.1.2.3:5000";

    #[test]
    fn writes_need_a_user_with_the_role_the_action_names() {
        let a = access(&[("reconfig", &["admins"])], true);
        let peer = LOCAL.parse().expect("addr");
        let none = HeaderMap::new();
        assert_eq!(
            writer(&a, &none, peer, WwwAction::Force),
            Err(Denied::NeedsUser)
        );
        assert_eq!(
            writer(&a, &basic("ann", "wrong"), peer, WwwAction::Force),
            Err(Denied::NeedsUser)
        );
        assert_eq!(
            writer(&a, &basic("nobody", "pw-ann"), peer, WwwAction::Force),
            Err(Denied::NeedsUser)
        );
        assert_eq!(
            writer(&a, &basic("dev", "pw-dev"), peer, WwwAction::Force),
            Ok("dev".to_string()),
            "force is not in authz: any user"
        );
        assert!(matches!(
            writer(&a, &basic("dev", "pw-dev"), peer, WwwAction::Reconfig),
            Err(Denied::Role { .. })
        ));
        assert_eq!(
            writer(&a, &basic("ann", "pw-ann"), peer, WwwAction::Reconfig),
            Ok("ann".to_string())
        );
    }

    #[test]
    fn without_users_only_this_machine_writes_and_reads_follow_public_read() {
        let open = Access::of(None);
        let h = HeaderMap::new();
        assert_eq!(
            writer(&open, &h, LOCAL.parse().expect("a"), WwwAction::Stop),
            Ok(String::new())
        );
        assert_eq!(
            writer(&open, &h, REMOTE.parse().expect("a"), WwwAction::Stop),
            Err(Denied::NotLocal)
        );
        assert_eq!(reader(&open, &h, REMOTE.parse().expect("a")), Ok(()));

        let closed = access(&[], false);
        let remote = REMOTE.parse().expect("a");
        assert_eq!(reader(&closed, &h, remote), Err(Denied::NeedsUser));
        assert_eq!(reader(&closed, &basic("dev", "pw-dev"), remote), Ok(()));
        assert_eq!(
            reader(&closed, &basic("dev", "nope"), remote),
            Err(Denied::NeedsUser)
        );
    }

    #[test]
    fn a_browser_write_from_another_site_is_refused_even_from_loopback() {
        let open = Access::of(None);
        let peer = LOCAL.parse().expect("addr");
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8010".parse().expect("h"));
        h.insert("origin", "http://127.0.0.1:8010".parse().expect("h"));
        assert_eq!(writer(&open, &h, peer, WwwAction::Force), Ok(String::new()));
        h.insert("origin", "https://evil.example".parse().expect("h"));
        assert!(matches!(
            writer(&open, &h, peer, WwwAction::Force),
            Err(Denied::CrossSite(_))
        ));
        let mut fetch = HeaderMap::new();
        fetch.insert("sec-fetch-site", "cross-site".parse().expect("h"));
        assert!(matches!(
            writer(&open, &fetch, peer, WwwAction::Force),
            Err(Denied::CrossSite(_))
        ));
    }
}

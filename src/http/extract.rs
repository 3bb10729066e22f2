//! What a write handler asks for in its signature, so that no handler can
//! forget it: [`Writer`] (the caller, once `www.authz` allows the action),
//! [`Caller`] (when the action depends on the method), [`Hook`] (a change hook's caller) and [`Rpc`] (a JSON-RPC 2.0 call).
//! Each rejects with the response the client gets.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{auth, AppState};
use crate::config::WwwAction;

/// A `www.authz` action, as a type a handler can name.
pub(super) trait Action: Send + Sync {
    const ACTION: WwwAction;
}

macro_rules! actions {
    ($($name:ident),*) => {$(
        pub(super) struct $name;
        impl Action for $name {
            const ACTION: WwwAction = WwwAction::$name;
        }
    )*};
}
actions!(Reconfig, Force, Stop, Cancel, Workers, Rebuild);

/// The caller of a write that needs action `A`: its user name (empty when
/// no users are configured) and its address.
pub(super) struct Writer<A> {
    pub user: String,
    pub peer: SocketAddr,
    action: PhantomData<A>,
}

impl<A> Writer<A> {
    /// Who did it, for reasons and triggers: the user, or else the address.
    pub fn who(&self) -> String {
        if self.user.is_empty() {
            self.peer.ip().to_string()
        } else {
            self.user.clone()
        }
    }
}

#[allow(clippy::result_large_err)] // the error is the response itself, answered at once
fn peer_of(parts: &Parts) -> Result<SocketAddr, Response> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .ok_or_else(|| {
            // Only a router served without connect info gets here: a bug
            // of ours, not the client's.
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server does not know the caller's address",
            )
                .into_response()
        })
}

/// Whether `www.authz` lets this caller do `A`.
#[allow(clippy::result_large_err)] // the error is the response itself, answered at once
fn authorize<A: Action>(
    st: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Writer<A>, Response> {
    let verdict = {
        let access = crate::sync::read(&st.access);
        auth::writer(&access, headers, peer, A::ACTION)
    };
    match verdict {
        Ok(user) => Ok(Writer {
            user,
            peer,
            action: PhantomData,
        }),
        Err(d) => Err(quietly(d, headers).into_response()),
    }
}

/// A refusal for want of a user, without the browser's own dialog when the
/// web page asked (it sends `X-Requested-With`).
pub(super) fn quietly(d: auth::Denied, headers: &HeaderMap) -> auth::Denied {
    match d {
        auth::Denied::NeedsUser if headers.contains_key("x-requested-with") => {
            auth::Denied::NeedsUserQuietly
        }
        other => other,
    }
}

impl<A: Action> FromRequestParts<Arc<AppState>> for Writer<A> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Self, Response> {
        let peer = peer_of(parts)?;
        authorize(st, &parts.headers, peer)
    }
}

/// The caller of a call whose action depends on its method (a build's
/// `stop` or `rebuild`): [`Caller::writer`] asks `www.authz` once the
/// method is known.
pub(super) struct Caller {
    headers: HeaderMap,
    peer: SocketAddr,
}

impl Caller {
    #[allow(clippy::result_large_err)] // the error is the response itself
    pub fn writer<A: Action>(&self, st: &AppState) -> Result<Writer<A>, Response> {
        authorize(st, &self.headers, self.peer)
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<AppState>) -> Result<Self, Response> {
        Ok(Caller {
            headers: parts.headers.clone(),
            peer: peer_of(parts)?,
        })
    }
}

/// A change hook's caller, once [`auth::hook`] lets it in.
pub(super) struct Hook;

impl FromRequestParts<Arc<AppState>> for Hook {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Self, Response> {
        let peer = peer_of(parts)?;
        let access = crate::sync::read(&st.access);
        auth::hook(&access, &parts.headers, peer)
            .map(|()| Hook)
            .map_err(IntoResponse::into_response)
    }
}

/// A JSON-RPC 2.0 call: its id (echoed in the answer), method and params
/// (`{}` when absent).
pub(super) struct Rpc {
    pub id: Value,
    pub method: String,
    pub params: Value,
}

impl Rpc {
    /// The successful answer.
    pub fn result(&self, result: Value) -> Response {
        Json(json!({ "jsonrpc": "2.0", "id": self.id, "result": result })).into_response()
    }

    /// An error answer with an HTTP status and a JSON-RPC code.
    pub fn error(&self, status: StatusCode, code: i64, message: String) -> Response {
        rpc_error(status, &self.id, code, message)
    }

    /// The error for a method this collection does not have.
    pub fn no_such_method(&self, have: &str) -> Response {
        self.error(
            StatusCode::BAD_REQUEST,
            -32601,
            format!("{have}, not `{}`", self.method),
        )
    }
}

impl<S: Send + Sync> FromRequest<S> for Rpc {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let call: Value = serde_json::from_slice(&body).map_err(|e| {
            rpc_error(
                StatusCode::BAD_REQUEST,
                &Value::Null,
                -32700,
                format!("not JSON: {e}"),
            )
        })?;
        let id = call.get("id").cloned().unwrap_or(Value::Null);
        let Some(method) = call.get("method").and_then(Value::as_str) else {
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                &id,
                -32600,
                "no `method`".into(),
            ));
        };
        Ok(Rpc {
            method: method.to_string(),
            params: call.get("params").cloned().unwrap_or_else(|| json!({})),
            id,
        })
    }
}

/// A JSON-RPC error answer.
pub(super) fn rpc_error(status: StatusCode, id: &Value, code: i64, message: String) -> Response {
    (
        status,
        Json(json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": { "code": code, "message": message },
        })),
    )
        .into_response()
}

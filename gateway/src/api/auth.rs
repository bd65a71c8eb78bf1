//! Who may call the API: bearer tokens with a role (viewer < operator < admin), from
//! `[[http.tokens]]`. Only SHA-256 hashes of the tokens are kept in memory, compared in
//! constant time. Not here: TLS (see [`crate::tls`]) and the device side (MQTT accounts).
//!
//! Policy ([`required_role`]): paths outside `/api/` and `/metrics` (the dashboard and its
//! assets) are public; reads need viewer; writes need operator; admin things (device import,
//! rules, tokens, anything under `/api/v1/admin`) need admin. With no token configured the API
//! is open, and [`check_exposure`] refuses a listen address other than loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: devices, readings, incidents, quarantine, metrics, the live stream.
    Viewer,
    /// Plus the closed loop: incident transitions, silences, inspections.
    Operator,
    /// Plus configuration-like writes: device import, rules, tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s).ok_or_else(|| format!("{s:?}: one of viewer, operator, admin"))
    }
}

/// One `[[http.tokens]]` entry: exactly one of `token` (the secret itself) or `token_sha256`
/// (its SHA-256, hex; what `citywatch token create` prints, so the file holds no secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token; recorded as the actor of the incident transitions it makes.
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// Shortest plaintext token accepted in the config (a guessable token is no token).
pub const MIN_TOKEN_LEN: usize = 16;

/// Checks `[[http.tokens]]`; the error names the key (`http.tokens[1].token_sha256`).
pub fn validate(tokens: &[TokenConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    let mut hashes = std::collections::HashSet::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = |k: &str| format!("http.tokens[{i}].{k}");
        if t.name.trim().is_empty() {
            return Err((key("name"), "must not be empty".into()));
        }
        if !names.insert(t.name.as_str()) {
            return Err((key("name"), format!("{:?} is used by another token", t.name)));
        }
        let hash = match (&t.token, &t.token_sha256) {
            (Some(_), Some(_)) => return Err((key("token"), "give token or token_sha256, not both".into())),
            (None, None) => return Err((key("token"), "missing: give token or token_sha256 (see `citywatch token create`)".into())),
            (Some(token), None) => {
                if token.len() < MIN_TOKEN_LEN {
                    return Err((key("token"), format!("at least {MIN_TOKEN_LEN} characters (use `citywatch token create`)")));
                }
                sha256(token)
            }
            (None, Some(hex_hash)) => parse_sha256(hex_hash).ok_or_else(|| (key("token_sha256"), "must be 64 hex digits (SHA-256 of the token)".into()))?,
        };
        if !hashes.insert(hash) {
            return Err((key("token"), "the same token is configured twice".into()));
        }
    }
    Ok(())
}

/// With no token the API is open, so it may only listen on loopback.
pub fn check_exposure(listen: SocketAddr, tokens: &[TokenConfig]) -> Result<(), (String, String)> {
    if tokens.is_empty() && !listen.ip().is_loopback() {
        return Err((
            "http.listen".into(),
            format!("{listen} is not a loopback address and no [[http.tokens]] is configured: the API would be open to the network (add a token with `citywatch token create`, or listen on 127.0.0.1)"),
        ));
    }
    Ok(())
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Equal in time independent of where the bytes differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token that matched: handlers find it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

struct Known {
    hash: [u8; 32],
    caller: Caller,
}

/// The configured tokens, hashed.
pub struct Authenticator {
    known: Vec<Known>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("tokens", &self.known.len()).finish()
    }
}

impl Authenticator {
    /// Hashes the tokens; entries [`validate`] would reject are skipped (config is validated
    /// before the gateway starts).
    pub fn new(tokens: &[TokenConfig]) -> Authenticator {
        let known = tokens
            .iter()
            .filter_map(|t| {
                let hash = match (&t.token, &t.token_sha256) {
                    (Some(token), None) => sha256(token),
                    (None, Some(h)) => parse_sha256(h)?,
                    _ => return None,
                };
                Some(Known { hash, caller: Caller { name: t.name.clone(), role: t.role } })
            })
            .collect();
        Authenticator { known }
    }

    /// True when no token is configured: the API is open (on loopback only).
    pub fn is_open(&self) -> bool {
        self.known.is_empty()
    }

    /// The caller a presented token belongs to. Every configured hash is compared, in constant
    /// time, so the answer's timing says nothing about which token came close.
    pub fn identify(&self, presented: &str) -> Option<Caller> {
        let hash = sha256(presented);
        let mut found = None;
        for k in &self.known {
            if ct_eq(&k.hash, &hash) && found.is_none() {
                found = Some(k.caller.clone());
            }
        }
        found
    }
}

/// Paths only an admin may write to.
fn admin_path(path: &str) -> bool {
    path == "/api/v1/devices/import"
        || path == "/api/v1/rules"
        || path.starts_with("/api/v1/rules/")
        || path == "/api/v1/tokens"
        || path.starts_with("/api/v1/tokens/")
        || path == "/api/v1/admin"
        || path.starts_with("/api/v1/admin/")
}

/// The role a request needs; `None`: public (the dashboard and its assets).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if !(path == "/api" || path.starts_with("/api/") || path == "/metrics" || path.starts_with("/metrics/")) {
        return None;
    }
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    Some(match (read, admin_path(path)) {
        (true, _) => Role::Viewer,
        (false, true) => Role::Admin,
        (false, false) => Role::Operator,
    })
}

/// The bearer token of a request: `Authorization: Bearer …`, or for the live stream only
/// (browsers' EventSource cannot set headers) `?access_token=…`.
fn presented_token(req: &Request) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned());
    }
    if req.method() == Method::GET && req.uri().path() == "/api/v1/events" {
        return req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("access_token=")).map(str::to_owned);
    }
    None
}

fn unauthorized(message: &str, invalid: bool) -> Response {
    let challenge = if invalid { "Bearer realm=\"citywatch\", error=\"invalid_token\"" } else { "Bearer realm=\"citywatch\"" };
    let mut response = (StatusCode::UNAUTHORIZED, Json(json!({ "error": message }))).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// The middleware: lets public paths through, else identifies the caller and checks its role.
pub async fn require(State(auth): State<Arc<Authenticator>>, mut req: Request, next: Next) -> Response {
    let Some(needed) = required_role(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    if auth.is_open() {
        return next.run(req).await;
    }
    let caller = match presented_token(&req) {
        None => return unauthorized("missing bearer token: send Authorization: Bearer <token>", false),
        Some(token) => match auth.identify(&token) {
            Some(caller) => caller,
            None => return unauthorized("invalid bearer token", true),
        },
    };
    if caller.role < needed {
        let message = format!("token {:?} has role {}; this needs {}", caller.name, caller.role.as_str(), needed.as_str());
        return (StatusCode::FORBIDDEN, Json(json!({ "error": message }))).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Wraps a router (every route, the fallback included) in the token check, and every error
/// of the whole app — routers merged into the API's included — in JSON ([`super::error::json_errors`]).
pub fn protect(router: axum::Router, auth: Arc<Authenticator>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(auth, require)).layer(axum::middleware::from_fn(super::error::json_errors))
}

/// A fresh random token (256 bits from the OS-seeded CSPRNG), printable.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("cw_{}", hex::encode(bytes))
}

/// What `citywatch token create` prints: the token once, and the config snippet with its hash.
pub fn token_snippet(name: &str, role: Role, token: &str) -> String {
    format!(
        "token (shown once; give it to {name}, it is not stored anywhere):\n{token}\n\n# add to the gateway's config:\n[[http.tokens]]\nname = {}\nrole = \"{}\"\ntoken_sha256 = \"{}\"\n",
        toml_string(name),
        role.as_str(),
        hex::encode(sha256(token))
    )
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;

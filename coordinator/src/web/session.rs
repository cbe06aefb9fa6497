//! Sign-in: a Kiln bearer token posted to `/login` opens a session.
//!
//! The session cookie is `HttpOnly` and `SameSite=Strict` (and `Secure`
//! over TLS) and names a random id; the token itself stays on the server
//! and is checked again on every request, so revoking it ends its sessions.
//! Each session has a random CSRF token that every form carries; a POST
//! without it is refused with 403. The login form itself is protected the
//! same way with a short-lived cookie (double submit), since no session
//! exists yet.
//!
//! `curl` and scripts may send `authorization: Bearer <token>` instead of
//! a cookie to read pages, `/log` and `/events`; they get no CSRF token,
//! so they cannot post forms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use askama::Template;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use serde::Deserialize;

use super::Web;
use super::format::{Chrome, error_page, render, url_encode};
use crate::auth::{Principal, rule};
use crate::clock::{Clock, SystemClock};

const SESSION_COOKIE: &str = "kiln_session";
const LOGIN_COOKIE: &str = "kiln_login";
/// A session ends this long after sign-in.
const SESSION_TTL_MS: u64 = 12 * 60 * 60 * 1000;
/// Open sessions kept at most; the oldest goes first past it, so a script
/// signing in in a loop cannot grow the coordinator's memory.
const MAX_SESSIONS: usize = 10_000;

struct Session {
    /// The bearer token, checked again on every request.
    token: String,
    csrf: String,
    expires_ms: u64,
}

/// Open sessions by id, in memory: a coordinator restart signs everyone
/// out, which costs a sign-in and keeps tokens off the disk.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session; returns its id.
    fn open(&self, token: String, now_ms: u64) -> String {
        let id = random_hex();
        let mut open = self.lock();
        open.retain(|_, session| session.expires_ms > now_ms);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, session)| session.expires_ms)
                .map(|(id, _)| id.clone())
        {
            open.remove(&oldest);
        }
        open.insert(
            id.clone(),
            Session {
                token,
                csrf: random_hex(),
                expires_ms: now_ms + SESSION_TTL_MS,
            },
        );
        id
    }

    /// The token and CSRF token of a live session.
    fn get(&self, id: &str, now_ms: u64) -> Option<(String, String)> {
        let mut open = self.lock();
        match open.get(id) {
            Some(session) if session.expires_ms > now_ms => {
                Some((session.token.clone(), session.csrf.clone()))
            }
            Some(_) => {
                open.remove(id);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.lock().remove(id);
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares secrets without stopping at the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

/// The method path the rule table knows a `ControlService` call by.
pub(crate) fn method_path(method: &str) -> String {
    format!("/kiln.v1.ControlService/{method}")
}

/// A token may sign in when it may read runs: users of every role, not
/// agents or pipeline tokens.
fn may_read(principal: &Principal) -> bool {
    rule(&method_path("GetRun")).is_some_and(|rule| rule.allows(principal.role))
}

/// A signed-in request: who, and the session's CSRF token (`None` for a
/// bearer token sent by a script).
pub(crate) struct Signed {
    pub(crate) principal: Principal,
    csrf: Option<String>,
    session: Option<String>,
}

impl Signed {
    /// Whether the rule table lets this principal call `method`: the
    /// pages show only the buttons that would be accepted.
    pub(crate) fn can(&self, method: &str) -> bool {
        rule(&method_path(method)).is_some_and(|rule| rule.allows(self.principal.role))
    }

    /// What the page frame shows: who is signed in, and the token the
    /// sign-out and action forms carry.
    pub(crate) fn chrome(&self) -> Chrome {
        Chrome {
            user: self.principal.name.clone(),
            role: crate::auth::layer::role_name(self.principal.role),
            csrf: self.csrf.clone().unwrap_or_default(),
        }
    }

    /// Refuses a form without this session's CSRF token (the refusal is
    /// the page to send).
    #[allow(clippy::result_large_err)]
    pub(crate) fn check_csrf(&self, sent: Option<&str>) -> Result<(), Response> {
        match (&self.csrf, sent) {
            (Some(expected), Some(sent)) if same_secret(expected, sent) => Ok(()),
            _ => Err(error_page(
                Some(self.chrome()),
                StatusCode::FORBIDDEN,
                "this form has no valid CSRF token; reload the page and submit it again",
            )),
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Where an unsigned request goes: a page to the sign-in page (and back
/// here after it); a form post or a request that does not want HTML
/// (`curl`, an event stream) gets a refusal that says how to sign in.
fn to_login(parts: &Parts) -> Response {
    let wants_html = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if parts.method == axum::http::Method::POST {
        return error_page(
            None,
            StatusCode::FORBIDDEN,
            "sign in first: this form needs a session (open /login)",
        );
    }
    if !wants_html {
        return (
            StatusCode::UNAUTHORIZED,
            "sign in at /login, or send `authorization: Bearer <token>` with a Kiln token\n",
        )
            .into_response();
    }
    let here = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    Redirect::to(&format!("/login?next={}", url_encode(here))).into_response()
}

impl FromRequestParts<Arc<Web>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Arc<Web>) -> Result<Self, Response> {
        if let Some(token) = bearer(&parts.headers) {
            return match web.auth.tokens.authenticate(token) {
                Ok(principal) if may_read(&principal) => Ok(Signed {
                    principal,
                    csrf: None,
                    session: None,
                }),
                Ok(principal) => Err(error_page(
                    None,
                    StatusCode::FORBIDDEN,
                    &format!("token `{}` may not read the dashboard", principal.name),
                )),
                Err(error) => Err(error_page(
                    None,
                    StatusCode::UNAUTHORIZED,
                    &error.to_string(),
                )),
            };
        }
        let now = SystemClock.now_ms();
        let Some(id) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login(parts));
        };
        let Some((token, csrf)) = web.sessions.get(id, now) else {
            return Err(to_login(parts));
        };
        match web.auth.tokens.authenticate(&token) {
            Ok(principal) if may_read(&principal) => Ok(Signed {
                principal,
                csrf: Some(csrf),
                session: Some(id.to_owned()),
            }),
            // Revoked since sign-in.
            _ => {
                web.sessions.close(id);
                Err(to_login(parts))
            }
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    /// Empty: nobody is signed in yet.
    chrome: Chrome,
    csrf: String,
    next: String,
    error: String,
}

#[derive(Deserialize)]
pub(crate) struct NextQuery {
    #[serde(default)]
    next: String,
}

/// Only a path on this site: `next` never sends anyone elsewhere.
fn safe_next(next: &str) -> String {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next.to_owned()
    } else {
        "/".to_owned()
    }
}

fn cookie_header(web: &Web, name: &str, value: &str, path: &str, max_age: u64) -> HeaderValue {
    set_cookie(web.secure_cookies, name, value, path, max_age)
}

/// A `Set-Cookie` value: never readable by scripts, never sent from
/// another site, and only over TLS when the listener has it.
fn set_cookie(secure: bool, name: &str, value: &str, path: &str, max_age: u64) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn login_form(web: &Web, next: &str, status: StatusCode, error: &str) -> Response {
    let csrf = random_hex();
    let page = LoginPage {
        chrome: Chrome::default(),
        csrf: csrf.clone(),
        next: safe_next(next),
        error: error.to_owned(),
    };
    let mut response = render(&page);
    *response.status_mut() = status;
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(web, LOGIN_COOKIE, &csrf, "/login", 3600),
    );
    response
}

pub(crate) async fn login_page(
    State(web): State<Arc<Web>>,
    Query(query): Query<NextQuery>,
) -> Response {
    login_form(&web, &query.next, StatusCode::OK, "")
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
    csrf: Option<String>,
    #[serde(default)]
    next: String,
}

pub(crate) async fn login(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, LOGIN_COOKIE);
    let csrf_ok =
        matches!((expected, form.csrf.as_deref()), (Some(a), Some(b)) if same_secret(a, b));
    if !csrf_ok {
        return error_page(
            None,
            StatusCode::FORBIDDEN,
            "the sign-in form has no valid CSRF token; open /login again and sign in from there",
        );
    }
    let token = form.token.trim();
    let principal = match web.auth.tokens.authenticate(token) {
        Ok(principal) => principal,
        Err(error) => {
            return login_form(
                &web,
                &form.next,
                StatusCode::UNAUTHORIZED,
                &error.to_string(),
            );
        }
    };
    if !may_read(&principal) {
        let message = format!(
            "token `{}` is not a user token (viewer, operator or admin) and cannot sign in",
            principal.name
        );
        return login_form(&web, &form.next, StatusCode::FORBIDDEN, &message);
    }
    let id = web.sessions.open(token.to_owned(), SystemClock.now_ms());
    tracing::info!(user = %principal.name, "signed in to the dashboard");
    let mut response = Redirect::to(&safe_next(&form.next)).into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        cookie_header(&web, SESSION_COOKIE, &id, "/", SESSION_TTL_MS / 1000),
    );
    headers.append(
        header::SET_COOKIE,
        cookie_header(&web, LOGIN_COOKIE, "", "/login", 0),
    );
    response
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    pub(crate) csrf: Option<String>,
}

pub(crate) async fn logout(
    State(web): State<Arc<Web>>,
    signed: Signed,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Err(refused) = signed.check_csrf(form.csrf.as_deref()) {
        return refused;
    }
    if let Some(id) = &signed.session {
        web.sessions.close(id);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&web, SESSION_COOKIE, "", "/", 0),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_the_oldest_goes_first_when_full() {
        let sessions = Sessions::default();
        let id = sessions.open("t".into(), 0);
        assert!(sessions.get(&id, 1).is_some());
        assert!(sessions.get(&id, SESSION_TTL_MS + 1).is_none(), "expired");
        assert!(sessions.get(&id, 1).is_none(), "and forgotten");
        let first = sessions.open("t".into(), 0);
        for i in 1..MAX_SESSIONS as u64 + 1 {
            sessions.open("t".into(), i);
        }
        assert!(sessions.get(&first, 2).is_none(), "evicted");
        assert_eq!(sessions.lock().len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies_are_strict_and_secure_over_tls() {
        let plain = set_cookie(false, SESSION_COOKIE, "abc", "/", 60);
        assert_eq!(
            plain,
            "kiln_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        let tls = set_cookie(true, SESSION_COOKIE, "abc", "/", 60);
        assert_eq!(
            tls,
            "kiln_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next("/runs/3"), "/runs/3");
        assert_eq!(safe_next("//evil.example/x"), "/");
        assert_eq!(safe_next("https://evil.example"), "/");
        assert_eq!(safe_next(""), "/");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_session=abc; b=2"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}

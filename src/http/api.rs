//! `POST /api/v1`: the admin envelope of SPEC §4 over HTTP. The body goes
//! to the same dispatcher as the MQTT admin plane ([`crate::admin::handle`]:
//! roles, parameters, ClientToken, audit log) and the answer is the same
//! JSON text ([`crate::admin::envelope_text`]). The HTTP status mirrors the
//! answer's `Code` (200 `OK`, 400 `InvalidParameter`, 403 `Forbidden`, 404
//! `NotFound.*` and `BanNotFound`, 409 `Conflict` and the pool refusals, 503
//! `ServiceUnavailable`); the body is the envelope whatever the status.
//! A body over `[http] max_body_bytes` gets 413, and a content type other
//! than JSON 415, both with an `InvalidParameter` envelope.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::auth::{account, refusal};
use super::{Peer, Shared};

/// The HTTP status of an answer's `Code`.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "OK" => StatusCode::OK,
        "InvalidParameter" => StatusCode::BAD_REQUEST,
        "Forbidden" => StatusCode::FORBIDDEN,
        "ServiceUnavailable" => StatusCode::SERVICE_UNAVAILABLE,
        c if c.starts_with("NotFound") || c.ends_with("NotFound") => StatusCode::NOT_FOUND,
        _ => StatusCode::CONFLICT,
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

pub async fn handle(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let account = match account(&st, &headers, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if !is_json(&headers) {
        return refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidParameter",
            "request: Content-Type must be application/json",
        );
    }
    let limit = st.config.max_body_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "InvalidParameter",
                &format!("request: body exceeds the limit of {limit} bytes"),
            )
        }
    };
    let answer = crate::admin::handle(&st.admin, &account, &body).await;
    let status = status_of(answer.get("Code").and_then(|c| c.as_str()).unwrap_or(""));
    let text = crate::admin::envelope_text(&answer, false);
    let mut r = (status, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

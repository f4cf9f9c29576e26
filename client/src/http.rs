//! The admin request client over HTTP: `POST /api/v1` with Basic
//! credentials and the admin envelope as a JSON body, answered by the same
//! JSON as over the admin topics (docs/PROTOCOL.md §4, the broker's
//! `src/http/api.rs`). Plus a general request ([`HttpClient::request`]:
//! status, headers, body) and a streamed one ([`HttpClient::open`], for
//! `GET /api/events`' server-sent events) for what checks the listener
//! itself. Plain HTTP/1.1 over hyper-util's client; every wait is bounded
//! by the client's timeout and every failure is an [`HttpError`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

/// The admin API's path.
pub const API_PATH: &str = "/api/v1";

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("bad request to {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("request to {url} failed: {reason}")]
    Send { url: String, reason: String },
    #[error("no answer from {url} within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("reading the answer from {url}: {reason}")]
    Body { url: String, reason: String },
    #[error("the answer (status {status}) is not JSON ({reason}): {excerpt:?}")]
    NotJson {
        status: u16,
        reason: String,
        excerpt: String,
    },
    #[error("login as {account} refused by {url} (status {status}): {message}")]
    Refused {
        account: String,
        url: String,
        status: u16,
        message: String,
    },
}

/// An error and its causes, `: `-separated (hyper's own texts are terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `Authorization` value of Basic credentials.
pub fn basic(account: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{account}:{password}"))
    )
}

/// The `http://host:port` base of a URL given by a user (`host:port`
/// alone means plain HTTP; a path, query or `https` is refused).
pub fn base_of(url: &str) -> Result<String, HttpError> {
    let bad = |reason: &str| HttpError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = full.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported by this client; use http")),
        _ => return Err(bad("the scheme must be http")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host"))?
        .as_str()
        .to_owned();
    if authority.contains('@') {
        return Err(bad(
            "credentials go in --account and --password, not the URL",
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad(
            "give the listener's address only (http://host:port); the path is /api/v1",
        ));
    }
    Ok(format!("http://{authority}"))
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::NotJson {
            status: self.status,
            reason: e.to_string(),
            excerpt: self.text().chars().take(200).collect(),
        })
    }
}

/// An answer whose body is read as it comes (server-sent events).
#[derive(Debug)]
pub struct Streaming {
    pub status: u16,
    pub headers: HeaderMap,
    body: Incoming,
    url: String,
}

impl Streaming {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next piece of the body within `timeout`; `None` at its end.
    pub async fn next_chunk(&mut self, timeout: Duration) -> Result<Option<Bytes>, HttpError> {
        loop {
            let frame = tokio::time::timeout(timeout, self.body.frame())
                .await
                .map_err(|_| HttpError::Timeout {
                    url: self.url.clone(),
                    secs: timeout.as_secs(),
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(HttpError::Body {
                        url: self.url.clone(),
                        reason: chain(&e),
                    })
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// A client of one HTTP listener, optionally with an account's Basic
/// credentials; cheap to clone (connections are pooled and shared).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// The account and its `Authorization` value.
    credentials: Option<(String, String)>,
    timeout: Duration,
}

impl HttpClient {
    /// A client of `url` (`http://host:port`, see [`base_of`]) whose
    /// connections, answers and bodies each wait at most `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<HttpClient, HttpError> {
        Ok(HttpClient::of_base(base_of(url)?, timeout))
    }

    /// A client of the listener at `addr`.
    pub fn at(addr: SocketAddr, timeout: Duration) -> HttpClient {
        HttpClient::of_base(format!("http://{addr}"), timeout)
    }

    fn of_base(base: String, timeout: Duration) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base,
            credentials: None,
            timeout,
        }
    }

    /// The same client sending `account`'s Basic credentials with its
    /// admin requests.
    pub fn with_basic(&self, account: &str, password: &str) -> HttpClient {
        HttpClient {
            credentials: Some((account.to_owned(), basic(account, password))),
            ..self.clone()
        }
    }

    /// The listener's `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns its answer's status and headers with
    /// the body still to read.
    pub async fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Streaming, HttpError> {
        let url = format!("{}{path}", self.base);
        let bad = |reason: String| HttpError::Request {
            url: url.clone(),
            reason,
        };
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let mut req = hyper::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body.into()))
            .map_err(|e| bad(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })?
            .map_err(|e| HttpError::Send {
                url: url.clone(),
                reason: chain(&e),
            })?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        Ok(Streaming {
            status,
            headers: parts.headers,
            body,
            url,
        })
    }

    /// Sends a request and reads its whole answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, HttpError> {
        let open = self.open(method, path, headers, body).await?;
        let url = open.url;
        let body = tokio::time::timeout(self.timeout, open.body.collect())
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })?
            .map_err(|e| HttpError::Body {
                url,
                reason: chain(&e),
            })?
            .to_bytes();
        Ok(Reply {
            status: open.status,
            headers: open.headers,
            body,
        })
    }

    /// `GET path` without credentials.
    pub async fn get(&self, path: &str) -> Result<Reply, HttpError> {
        self.request("GET", path, &[], Bytes::new()).await
    }

    /// `POST /api/v1` with the client's credentials and `body` as JSON;
    /// the answer whatever its status.
    pub async fn api(&self, body: impl Into<Bytes>) -> Result<Reply, HttpError> {
        let mut headers = vec![("content-type", "application/json")];
        if let Some((_, auth)) = &self.credentials {
            headers.push(("authorization", auth.as_str()));
        }
        self.request("POST", API_PATH, &headers, body).await
    }

    /// Sends one request (`Action` and parameters; the broker adds a
    /// RequestId unless given) and returns its response, whatever its
    /// Code — like the MQTT client's `request`. A refused login (401) is
    /// an error, as a refused MQTT login is.
    pub async fn action(&self, params: Map<String, Value>) -> Result<Value, HttpError> {
        let reply = self.api(Value::Object(params).to_string()).await?;
        let answer = reply.json()?;
        if reply.status == 401 {
            return Err(HttpError::Refused {
                account: self
                    .credentials
                    .as_ref()
                    .map_or_else(|| "(no account)".to_owned(), |(a, _)| a.clone()),
                url: self.base.clone(),
                status: reply.status,
                message: answer
                    .get("Message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_base64_of_account_colon_password() {
        // RFC 7617's example.
        assert_eq!(
            basic("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn urls_are_listener_addresses() {
        for (given, base) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
            ("localhost:9000", "http://localhost:9000"),
            ("http://[::1]:8080", "http://[::1]:8080"),
        ] {
            assert_eq!(base_of(given).expect(given), base);
        }
        for (given, why) in [
            ("https://h:8443", "https is not supported"),
            ("ftp://h:21", "scheme must be http"),
            ("http://h:8080/api/v1", "address only"),
            ("http://h:8080/?x=1", "address only"),
            ("http://u:p@h:8080", "--account"),
            ("http://", "bad URL"),
        ] {
            let e = base_of(given).expect_err(given).to_string();
            assert!(e.contains(why), "{given}: {e}");
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_an_error_naming_status_and_excerpt() {
        let reply = Reply {
            status: 502,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"<html>Bad Gateway</html>"),
        };
        let e = reply.json().expect_err("not JSON").to_string();
        assert!(e.contains("502") && e.contains("Bad Gateway"), "{e}");
        let ok = Reply {
            body: Bytes::from_static(br#"{"Code":"OK"}"#),
            ..reply
        };
        assert_eq!(ok.json().expect("JSON")["Code"], "OK");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_send_error_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let c =
            HttpClient::new(&format!("127.0.0.1:{port}"), Duration::from_secs(5)).expect("client");
        let e = c.get("/metrics").await.expect_err("refused");
        let text = e.to_string();
        assert!(
            matches!(e, HttpError::Send { .. }) && text.contains(&format!(":{port}/metrics")),
            "{text}"
        );
    }
}

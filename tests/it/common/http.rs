//! The tests' side of the client crate's HTTP client
//! ([`activation_client::http`]): the same requests, with a transport
//! failure (no answer, a timeout) failing the test, naming the request.

use std::net::SocketAddr;

use activation_client::http::HttpClient;
pub use activation_client::http::{basic, Reply, Streaming};
use bytes::Bytes;
use serde_json::Value;

use super::broker::WAIT;

pub struct Http {
    client: HttpClient,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http {
            client: HttpClient::at(addr, WAIT),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.client
            .request(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], Bytes::new()).await
    }

    /// `POST /api/v1` with Basic credentials and a JSON body.
    pub async fn api(&self, user: &str, password: &str, body: &Value) -> Reply {
        self.client
            .with_basic(user, password)
            .api(body.to_string())
            .await
            .unwrap_or_else(|e| panic!("POST /api/v1 as {user}: {e}"))
    }

    /// A request whose answer's body is read as it comes (SSE).
    pub async fn open(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Streaming {
        self.client
            .open(method, path, headers, Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

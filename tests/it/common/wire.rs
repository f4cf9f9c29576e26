//! Raw-socket helpers for the reliability suite: hand-built CONNECTs with
//! arbitrary (even invalid) fields, waiting for the server to close, the
//! open-file limit, and a snapshot of what the ledger stores.

use std::net::SocketAddr;
use std::time::Duration;

use activation_broker::ledger::Ledger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::broker::{v4, TestBroker, WAIT};

/// Raises the soft open-file limit to the hard limit; returns the new soft
/// limit (1024 if it cannot be read).
pub fn raise_nofile() -> u64 {
    activation_client::limits::raise_open_file_limit()
        .or_else(|_| activation_client::limits::open_file_limit().map(|(soft, _)| soft))
        .unwrap_or(1024)
}

/// MQTT variable-length "remaining length" encoding.
pub fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

/// A fixed header plus body.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn field(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len().min(65_535) as u16).to_be_bytes());
    out.extend_from_slice(&v[..v.len().min(65_535)]);
}

/// A CONNECT with every field under the caller's control. `flags` is the
/// connect-flags byte as sent; the user name and password are written if
/// given, whatever the flags say (so inconsistent packets can be built).
#[derive(Debug, Clone)]
pub struct RawConnect {
    pub protocol_name: Vec<u8>,
    pub level: u8,
    pub flags: u8,
    pub keep_alive: u16,
    /// MQTT 5 properties (already encoded, without their length); ignored for other levels.
    pub properties: Vec<u8>,
    pub client_id: Vec<u8>,
    pub will: Option<(Vec<u8>, Vec<u8>)>,
    pub user: Option<Vec<u8>>,
    pub pass: Option<Vec<u8>>,
}

impl RawConnect {
    /// A well-formed CONNECT (clean session, user name and password).
    pub fn new(level: u8, client_id: &str, user: &str, pass: &str) -> Self {
        RawConnect {
            protocol_name: b"MQTT".to_vec(),
            level,
            flags: 0b1100_0010,
            keep_alive: 30,
            properties: Vec::new(),
            client_id: client_id.as_bytes().to_vec(),
            will: None,
            user: Some(user.as_bytes().to_vec()),
            pass: Some(pass.as_bytes().to_vec()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        field(&mut body, &self.protocol_name);
        body.push(self.level);
        body.push(self.flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == 5 {
            remaining_length(self.properties.len(), &mut body);
            body.extend_from_slice(&self.properties);
        }
        field(&mut body, &self.client_id);
        if let Some((topic, msg)) = &self.will {
            if self.level == 5 {
                body.push(0);
            }
            field(&mut body, topic);
            field(&mut body, msg);
        }
        if let Some(u) = &self.user {
            field(&mut body, u);
        }
        if let Some(p) = &self.pass {
            field(&mut body, p);
        }
        packet(0x10, &body)
    }
}

/// Reads until the server closes (EOF or reset) or `limit` passes; returns
/// what it sent and whether it closed.
pub async fn until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (all, closed)
}

/// Sends `bytes` on a fresh socket, half-closes it, and waits for the close.
pub async fn send_and_close(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    until_closed(&mut s, limit).await
}

/// What the ledger stores, in numbers: counters plus the invariants check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Total, Consumed, Available, Unassigned, Forfeited.
    pub counters: (u64, u64, u64, u64, u64),
}

pub fn snapshot(ledger: &Ledger) -> Snapshot {
    ledger
        .check_invariants()
        .unwrap_or_else(|e| panic!("invariant broken: {e}"));
    let c = ledger.counters();
    Snapshot {
        counters: (c.total, c.consumed, c.available, c.unassigned, c.forfeited),
    }
}

/// A good device (already activated, so it consumes nothing) still gets CONNACK 0.
pub async fn still_serving(t: &TestBroker, pk: &str, dk: &str, secret: &str) {
    let (u, p) = t.creds(pk, dk, secret);
    let (c, mut el) = v4::connect(t.addr(), &format!("{pk}.{dk}"), &u, &p)
        .await
        .unwrap_or_else(|code| panic!("broker no longer serves {pk}.{dk}: CONNACK {code}"));
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}

/// Reads exactly one MQTT packet (fixed header included); `None` if the
/// server closed first or nothing complete came within `limit`.
pub async fn read_packet(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(limit, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if buf.len() >= 2 {
                let mut len = 0usize;
                let mut i = 1;
                let mut complete = None;
                while i < buf.len() && i <= 4 {
                    len |= usize::from(buf[i] & 0x7F) << (7 * (i - 1));
                    if buf[i] & 0x80 == 0 {
                        complete = Some(i + 1 + len);
                        break;
                    }
                    i += 1;
                }
                if let Some(total) = complete {
                    if buf.len() >= total {
                        buf.truncate(total);
                        return Some(buf);
                    }
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The CONNACK code in what a server sent (`None`: no CONNACK).
pub fn connack_code(bytes: &[u8]) -> Option<u8> {
    (bytes.first() == Some(&0x20) && bytes.len() >= 4).then(|| bytes[3])
}

/// The CONNACK code of the next packet on `s` (`None`: closed, or no
/// complete CONNACK within [`WAIT`]).
pub async fn read_connack(s: &mut TcpStream) -> Option<u8> {
    read_packet(s, WAIT).await.as_deref().and_then(connack_code)
}

/// One raw CONNECT on a new socket; the CONNACK code (`None`: closed
/// without one).
pub async fn raw_connack(
    addr: SocketAddr,
    level: u8,
    id: &str,
    user: &str,
    pass: &str,
) -> Option<u8> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&RawConnect::new(level, id, user, pass).encode())
        .await
        .ok()?;
    read_connack(&mut s).await
}

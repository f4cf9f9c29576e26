//! `GET /api/events`: the broker's lifecycle events as server-sent events,
//! for accounts that may read events (`events = true`, like
//! `admin/v1/events/#`). Each message's data is the event's JSON (the
//! payload of `admin/v1/events/{kind}`) and its `event:` field the kind. A
//! reader that falls behind the event bus gets a `lagged` event with the
//! number of events it missed.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use super::auth::{account, refusal};
use super::{Peer, Shared};

pub async fn events(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let account = match account(&st, &headers, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if !account.events {
        return refusal(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("account {} may not read events", account.name),
        );
    }
    let stream = BroadcastStream::new(st.events.subscribe()).map(|e| {
        Ok::<_, Infallible>(match e {
            Ok(ev) => SseEvent::default()
                .event(ev.kind.as_str())
                .data(ev.render()),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                SseEvent::default().event("lagged").data(n.to_string())
            }
        })
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

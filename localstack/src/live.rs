//! The live page's feed: one Server-Sent Events stream per open page with, every second, the
//! vehicles that moved since the last message, the active alerts when they changed, the
//! functions' new metric buckets and the stack's counters. Plus the page's static assets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use geostream_shared::model::{Alert, AlertState};
use geostream_shared::now_millis;
use geostream_shared::ports::AlertFilter;
use serde_json::json;

use crate::Stack;

/// How often an open page gets news.
const TICK: Duration = Duration::from_secs(1);
/// Active alerts sent to the page, newest first.
const ALERTS_SHOWN: usize = 200;

/// What one open page has been sent so far.
#[derive(Default)]
struct PageState {
    /// Per vehicle, the reading time of the position last sent.
    sent_positions: HashMap<String, i64>,
    sent_alerts: Option<Vec<Alert>>,
    /// Epoch second of the newest metric bucket sent (that second may still grow, so it is
    /// sent again until it is complete).
    metrics_since: i64,
    first: bool,
}

impl PageState {
    async fn news(&mut self, stack: &Stack) -> Vec<Event> {
        let mut events = Vec::new();
        // The embedded store lists its positions; on the AWS backend the runner keeps the ones
        // its geo-update wrote (a DynamoDB scan every second would cost more than the page).
        let all = stack.vehicles();
        let note = stack.memory.is_none().then_some(
            "AWS backend: the map shows the vehicles this runner's geo-update has written since it started",
        );
        let moved: Vec<_> = all
            .into_iter()
            .filter(|p| self.sent_positions.get(&p.device_id) != Some(&p.ts))
            .collect();
        if !moved.is_empty() || self.first {
            let rows: Vec<_> = moved
                .iter()
                .map(|p| json!([p.device_id, p.lat, p.lon, p.speed_kmh, p.heading_deg, p.ts]))
                .collect();
            for p in moved {
                self.sent_positions.insert(p.device_id, p.ts);
            }
            let mut message = json!({ "vehicles": rows });
            if let (Some(note), true) = (note, self.first) {
                message["note"] = json!(note);
            }
            events.push(json_event("positions", message));
        }
        let filter = AlertFilter {
            state: Some(AlertState::Active),
            device_id: None,
            limit: ALERTS_SHOWN,
        };
        match stack.alerts.list_alerts(&filter).await {
            Ok(alerts) if self.sent_alerts.as_ref() != Some(&alerts) => {
                events.push(json_event("alerts", json!({ "alerts": alerts })));
                self.sent_alerts = Some(alerts);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "live page: alerts could not be listed"),
        }
        let series = stack.metrics.series_since(self.metrics_since - 1);
        if let Some(newest) = series
            .iter()
            .filter_map(|s| s.points.last().map(|p| p.t))
            .max()
        {
            self.metrics_since = newest;
        }
        events.push(json_event(
            "metrics",
            json!({ "now": now_millis() / 1000, "series": series }),
        ));
        events.push(json_event("stats", json!(stack.stats())));
        self.first = false;
        events
    }
}

fn json_event(name: &str, data: serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `GET /local/live`: the page's event stream; it ends when the stack shuts down.
pub async fn live(
    State(stack): State<Arc<Stack>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut shutdown = stack.shutdown.clone();
    let state = PageState {
        first: true,
        ..PageState::default()
    };
    let ticks = stream::unfold((stack, state), |(stack, mut state)| async move {
        if !state.first {
            tokio::time::sleep(TICK).await;
        }
        let events = state.news(&stack).await;
        Some((stream::iter(events.into_iter().map(Ok)), (stack, state)))
    })
    .flatten()
    .take_until(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}

/// The page's vendored libraries (pinned copies of npm packages; licences beside them).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "leaflet.js",
        "text/javascript",
        include_bytes!("../assets/vendor/leaflet-1.9.4/leaflet.js"),
    ),
    (
        "leaflet.css",
        "text/css",
        include_bytes!("../assets/vendor/leaflet-1.9.4/leaflet.css"),
    ),
    (
        "images/layers.png",
        "image/png",
        include_bytes!("../assets/vendor/leaflet-1.9.4/images/layers.png"),
    ),
    (
        "images/layers-2x.png",
        "image/png",
        include_bytes!("../assets/vendor/leaflet-1.9.4/images/layers-2x.png"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript",
        include_bytes!("../assets/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css",
        include_bytes!("../assets/vendor/uplot-1.6.32/uPlot.min.css"),
    ),
];

/// `GET /assets/{*path}`.
pub async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == path) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, format!("no asset {path}")).into_response(),
    }
}

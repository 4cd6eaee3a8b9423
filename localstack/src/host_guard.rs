//! What a web page the developer opens must not do to a runner on the developer's machine:
//! reach it through a name that resolves to it (DNS rebinding: the browser then treats the
//! runner as that page's own origin and reads its answers), or send it state-changing requests
//! from another origin (a form or `fetch` posting telemetry or acknowledging alerts).
//!
//! So the gateway answers only requests whose `Host` is an IP address (a rebinding page cannot
//! name one: it needs its own domain), `localhost`, or a name given with `--allowed-host`; and
//! refuses a request other than GET, HEAD or OPTIONS that carries an `Origin` other than the
//! runner itself. Devices, curl and the simulator send no `Origin` and are not affected.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The names the runner answers to besides IP addresses and `localhost`, lowercased.
#[derive(Debug, Clone, Default)]
pub struct HostGuard {
    allowed_names: Vec<String>,
}

impl HostGuard {
    pub fn new(allowed_names: &[String]) -> Self {
        HostGuard {
            allowed_names: allowed_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether `host` (a `Host` header value: a name or address, perhaps with a port) names
    /// this runner.
    fn host_allowed(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<axum::http::uri::Authority>() else {
            return false;
        };
        let name = authority.host().to_ascii_lowercase();
        name.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
            || name == "localhost"
            || self.allowed_names.contains(&name)
    }

    /// Why a request must be refused, if it must.
    pub fn refusal(&self, method: &Method, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !self.host_allowed(host) {
            return Some((
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host {host:?} does not name this runner: use its IP address or localhost, or start it with --allowed-host NAME"
                ),
            ));
        }
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        let same_origin = origin
            .to_str()
            .ok()
            .and_then(|o| o.parse::<Uri>().ok())
            .and_then(|uri| uri.authority().map(|a| a.as_str().to_ascii_lowercase()))
            .is_some_and(|authority| authority == host.to_ascii_lowercase());
        (!same_origin).then(|| {
            (
                StatusCode::FORBIDDEN,
                format!(
                    "a {method} from the web page at {origin:?} is refused: only this runner's own pages ({host}) may change its state"
                ),
            )
        })
    }
}

/// The gateway's middleware: refused requests get a JSON error, the others go on.
pub async fn guard(State(guard): State<Arc<HostGuard>>, request: Request, next: Next) -> Response {
    match guard.refusal(request.method(), request.headers()) {
        Some((status, message)) => {
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
        }
        None => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), value.parse().unwrap()))
            .collect()
    }

    #[test]
    fn addresses_localhost_and_named_hosts_pass_other_names_do_not() {
        let guard = HostGuard::new(&["Fleet.Example".to_string()]);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.7",
            "fleet.example:8080",
        ] {
            assert_eq!(
                guard.refusal(&Method::GET, &headers(&[(header::HOST, host)])),
                None,
                "{host}"
            );
        }
        for host in [
            "rebind.attacker.example:8080",
            "",
            "localhost.attacker.example",
        ] {
            let refusal = guard.refusal(&Method::GET, &headers(&[(header::HOST, host)]));
            assert_eq!(
                refusal.map(|(status, _)| status),
                Some(StatusCode::MISDIRECTED_REQUEST),
                "{host}"
            );
        }
    }

    #[test]
    fn a_state_change_from_another_origin_is_refused() {
        let guard = HostGuard::default();
        let post = |origin: Option<&str>| {
            let mut pairs = vec![(header::HOST, "127.0.0.1:8080")];
            if let Some(origin) = origin {
                pairs.push((header::ORIGIN, origin));
            }
            guard
                .refusal(&Method::POST, &headers(&pairs))
                .map(|(status, _)| status)
        };
        assert_eq!(post(None), None, "devices and curl send no Origin");
        assert_eq!(post(Some("http://127.0.0.1:8080")), None, "the live page");
        assert_eq!(
            post(Some("https://evil.example")),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            post(Some("http://127.0.0.1:9999")),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(post(Some("null")), Some(StatusCode::FORBIDDEN));
        let read = guard.refusal(
            &Method::GET,
            &headers(&[
                (header::HOST, "127.0.0.1:8080"),
                (header::ORIGIN, "https://evil.example"),
            ]),
        );
        assert_eq!(read, None, "reads are the Host check's to guard");
    }
}

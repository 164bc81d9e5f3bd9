//! The HTTP listener's series, through the `metrics` facade like the rest (nothing is
//! recorded without `--metrics-listen`).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `session_cache_http_requests_total` | counter | `path` (a route's path, or `other`), `status` |
//! | `session_cache_http_request_duration_seconds` | histogram | `path` |
//!
//! Its connections are counted with every listener's, `listener="http"` (`crate::metrics`).

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// The `path` label of a request no route claims.
pub(crate) const OTHER: &str = "other";

/// What the plumbing itself may answer on any path: a body that broke off (400), too
/// slow (408), too large (413).
pub(crate) const PLUMBING_STATUSES: [u16; 3] = [400, 408, 413];

/// What a route may also answer whatever its own statuses: the plumbing's, and 503 when
/// it has not answered within the request timeout.
const ROUTE_STATUSES: [u16; 4] = [400, 408, 413, 503];

/// Describes the families; called by `crate::metrics::install`.
pub(crate) fn describe() {
    describe_counter!(
        "session_cache_http_requests_total",
        "Requests answered on --http-listen, by route path (other: no route) and HTTP status"
    );
    describe_histogram!(
        "session_cache_http_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's head to its answer on --http-listen, by route path"
    );
}

/// Exports every series the listener can record at 0, once its routes are known: each
/// route's statuses and the plumbing's, and `other` with 404 and the plumbing's.
pub(crate) fn export<'a>(routes: impl IntoIterator<Item = (&'static str, &'a [u16])>) {
    let mut paths = vec![(OTHER, vec![404])];
    paths[0].1.extend(PLUMBING_STATUSES);
    for (path, statuses) in routes {
        let mut all = statuses.to_vec();
        all.extend(ROUTE_STATUSES);
        paths.push((path, all));
    }
    for (path, mut statuses) in paths {
        statuses.sort_unstable();
        statuses.dedup();
        for status in statuses {
            counter!("session_cache_http_requests_total", "path" => path, "status" => status.to_string())
                .absolute(0);
        }
        // Registered, so that its buckets are exported at 0 before the first request.
        let _ = histogram!("session_cache_http_request_duration_seconds", "path" => path);
    }
}

/// Records one answered request.
pub(crate) fn request(path: &'static str, status: u16, took: Duration) {
    counter!("session_cache_http_requests_total", "path" => path, "status" => status.to_string())
        .increment(1);
    histogram!("session_cache_http_request_duration_seconds", "path" => path)
        .record(took.as_secs_f64());
}

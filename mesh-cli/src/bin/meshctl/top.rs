//! `meshctl top`: a live table per service and direction (requests per
//! second, success, p50 and p99, bytes and connections per second), and
//! one per route rule (Gateway API) that decided requests, over each
//! interval, from the daemon's own counters: two reads of `GET
//! /v1/stats?buckets=true` and `GET /v1/stats/routes` an interval apart,
//! their difference divided by the time between them. The quantiles come
//! from the difference of the latency sketches, so they are the
//! interval's, to within 25%.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use hyper::Method;
use mesh_daemon::telemetry::metrics::LatencySketch;
use serde_json::{json, Value};

use crate::print::{s, table};
use crate::{call, ApiError};

/// Cumulative counts of one service and direction, summed over its
/// endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    requests: u64,
    ok: u64,
    bytes: u64,
    connections: u64,
    buckets: Vec<u64>,
}

/// One row of the table: an interval's rates.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    service: String,
    direction: String,
    requests_per_second: f64,
    /// Share of the interval's requests that succeeded (HTTP below 500,
    /// gRPC OK); None without requests.
    success_rate: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    bytes_per_second: f64,
    connections_per_second: f64,
}

impl Row {
    fn route_json(&self) -> Value {
        json!({
            "route": self.service,
            "rule": self.direction,
            "requestsPerSecond": self.requests_per_second,
            "successRate": self.success_rate,
            "p50Ms": self.p50_ms,
            "p99Ms": self.p99_ms,
        })
    }

    fn json(&self) -> Value {
        json!({
            "service": self.service,
            "direction": self.direction,
            "requestsPerSecond": self.requests_per_second,
            "successRate": self.success_rate,
            "p50Ms": self.p50_ms,
            "p99Ms": self.p99_ms,
            "bytesPerSecond": self.bytes_per_second,
            "connectionsPerSecond": self.connections_per_second,
        })
    }
}

/// The stats rows summed by (service, direction).
fn totals(rows: &[Value]) -> BTreeMap<(String, String), Totals> {
    totals_by(rows, ("service", "direction"))
}

/// The rows summed by the two fields of `key` (route rows: `route`,
/// `rule`, and no bytes or connections).
fn totals_by(rows: &[Value], key: (&str, &str)) -> BTreeMap<(String, String), Totals> {
    let mut out: BTreeMap<(String, String), Totals> = BTreeMap::new();
    for r in rows {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let t = out.entry((s(&r[key.0]), s(&r[key.1]))).or_default();
        let requests = n("requests");
        t.requests += requests;
        // successRate is ok / requests of this row: ok back, exactly.
        t.ok += r["successRate"].as_f64().map_or(0, |x| (x * requests as f64).round() as u64);
        t.bytes += n("bytesSent") + n("bytesReceived");
        t.connections += n("opened");
        let b: Vec<u64> =
            r["latencyBuckets"].as_array().into_iter().flatten().map(|v| v.as_u64().unwrap_or(0)).collect();
        if t.buckets.len() < b.len() {
            t.buckets.resize(b.len(), 0);
        }
        t.buckets.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    }
    out
}

/// The rates between two reads `secs` apart. A series that went away and
/// came back (its counts fell) is taken from zero.
fn rates(before: &BTreeMap<(String, String), Totals>, now: &BTreeMap<(String, String), Totals>, secs: f64) -> Vec<Row> {
    let mut rows: Vec<Row> = now
        .iter()
        .map(|(key, t)| {
            let zero = Totals::default();
            let b = before.get(key).filter(|b| b.requests <= t.requests && b.bytes <= t.bytes).unwrap_or(&zero);
            let requests = t.requests - b.requests;
            let buckets: Vec<u64> = t
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(b.buckets.get(i).copied().unwrap_or(0)))
                .collect();
            Row {
                service: key.0.clone(),
                direction: key.1.clone(),
                requests_per_second: requests as f64 / secs,
                success_rate: (requests > 0).then(|| t.ok.saturating_sub(b.ok) as f64 / requests as f64),
                p50_ms: LatencySketch::quantile_of(&buckets, 0.5),
                p99_ms: LatencySketch::quantile_of(&buckets, 0.99),
                bytes_per_second: t.bytes.saturating_sub(b.bytes) as f64 / secs,
                connections_per_second: t.connections.saturating_sub(b.connections) as f64 / secs,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.requests_per_second
            .total_cmp(&a.requests_per_second)
            .then(b.bytes_per_second.total_cmp(&a.bytes_per_second))
            .then_with(|| (&a.service, &a.direction).cmp(&(&b.service, &b.direction)))
    });
    rows
}

type Read = (BTreeMap<(String, String), Totals>, BTreeMap<(String, String), Totals>);

/// The services' and the route rules' totals now.
async fn read(socket: &Path) -> anyhow::Result<Read> {
    let services = match call(socket, Method::GET, "/v1/stats?buckets=true", None, None).await? {
        Ok(Value::Array(rows)) => totals(&rows),
        Ok(other) => bail!("the daemon answered /v1/stats with {other}, not a list"),
        Err(ApiError { status, body }) => bail!("the daemon refused the request ({status}): {}", s(&body["error"])),
    };
    let routes = match call(socket, Method::GET, "/v1/stats/routes", None, None).await? {
        Ok(Value::Array(rows)) => totals_by(&rows, ("route", "rule")),
        Ok(other) => bail!("the daemon answered /v1/stats/routes with {other}, not a list"),
        // A daemon from before route rows.
        Err(e) if e.status == hyper::StatusCode::NOT_FOUND => BTreeMap::new(),
        Err(ApiError { status, body }) => bail!("the daemon refused the request ({status}): {}", s(&body["error"])),
    };
    Ok((services, routes))
}

/// A row's key, rate, success and quantiles, as the tables show them.
fn cells(r: &Row) -> Vec<String> {
    vec![
        r.service.clone(),
        r.direction.clone(),
        format!("{:.1}", r.requests_per_second),
        r.success_rate.map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
        ms(r.p50_ms),
        ms(r.p99_ms),
    ]
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// Runs `top`: a table every `interval` (the screen redrawn on a
/// terminal, one table after another when piped, a JSON line each with
/// `json`), `iterations` times or until interrupted.
pub async fn top(socket: &Path, interval: Duration, iterations: Option<u64>, json_out: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal() && !json_out;
    let mut before = read(socket).await?;
    let mut at = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(at + interval, interval);
    let mut done = 0;
    while iterations.is_none_or(|n| done < n) {
        ticks.tick().await;
        let now = read(socket).await?;
        let now_at = tokio::time::Instant::now();
        let secs = (now_at - at).as_secs_f64();
        let rows = rates(&before.0, &now.0, secs);
        let routes = rates(&before.1, &now.1, secs);
        (before, at) = (now, now_at);
        done += 1;
        if json_out {
            println!(
                "{}",
                json!({
                    "intervalSeconds": (secs * 1000.0).round() / 1000.0,
                    "services": rows.iter().map(Row::json).collect::<Vec<_>>(),
                    "routes": routes.iter().map(Row::route_json).collect::<Vec<_>>(),
                })
            );
            continue;
        }
        if tty {
            print!("\x1b[H\x1b[2J");
        }
        println!("meshctl top: per service and direction over the last {secs:.1} s (Ctrl-C to stop)");
        let service_cells = |r: &Row| {
            let mut c = cells(r);
            c.extend([format!("{:.0}", r.bytes_per_second), format!("{:.1}", r.connections_per_second)]);
            c
        };
        table(
            &["SERVICE", "DIRECTION", "RPS", "SUCCESS", "P50(ms)", "P99(ms)", "BYTES/S", "CONN/S"],
            rows.iter().map(service_cells).collect(),
        );
        if !routes.is_empty() {
            println!();
            table(&["ROUTE", "RULE", "RPS", "SUCCESS", "P50(ms)", "P99(ms)"], routes.iter().map(cells).collect());
        }
        if !tty {
            println!();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(service: &str, requests: u64, success: f64, bytes: u64, buckets: &[u64]) -> Value {
        json!({
            "service": service, "endpoint": "10.0.0.1:80", "direction": "outbound", "opened": requests / 10,
            "bytesSent": bytes, "bytesReceived": bytes, "requests": requests, "successRate": success,
            "latencyBuckets": buckets,
        })
    }

    #[test]
    fn an_interval_is_the_difference_of_two_reads() {
        let before =
            totals(&[row("default/web:80", 100, 1.0, 1000, &[0, 100, 0]), row("default/api:80", 0, 0.0, 0, &[])]);
        // 200 more requests over two endpoints in 2 s, 20 of them failed,
        // most in bucket 1, a tail in bucket 2.
        let now = totals(&[
            row("default/web:80", 200, 0.9, 2000, &[0, 180, 20]),
            row("default/web:80", 100, 0.9, 1000, &[0, 100, 0]),
            row("default/api:80", 0, 0.0, 0, &[]),
        ]);
        let rows = rates(&before, &now, 2.0);
        assert_eq!(rows[0].service, "default/web:80");
        assert_eq!(rows[0].requests_per_second, 100.0);
        assert_eq!(rows[0].success_rate, Some(0.85), "270 of 300 ok now, 100 of 100 before: 170 of 200");
        assert_eq!(rows[0].bytes_per_second, 2000.0);
        assert_eq!(rows[0].p50_ms, LatencySketch::quantile_of(&[0, 1, 0], 0.5));
        assert_eq!(rows[0].p99_ms, LatencySketch::quantile_of(&[0, 0, 1], 0.5), "20 of 200 in the tail");
        assert_eq!((rows[1].requests_per_second, rows[1].success_rate, rows[1].p50_ms), (0.0, None, None));
    }

    #[test]
    fn route_rows_are_summed_by_route_and_rule() {
        let r = |rule: &str, requests: u64, success: f64, buckets: &[u64]| {
            json!({ "route": "default/web", "rule": rule, "requests": requests, "successRate": success,
                    "latencyBuckets": buckets })
        };
        let before = totals_by(&[r("0", 10, 1.0, &[10])], ("route", "rule"));
        let now = totals_by(&[r("0", 30, 0.5, &[10, 20]), r("v2", 4, 1.0, &[4])], ("route", "rule"));
        let rows = rates(&before, &now, 2.0);
        assert_eq!((rows[0].service.as_str(), rows[0].direction.as_str()), ("default/web", "0"));
        assert_eq!(rows[0].requests_per_second, 10.0);
        assert_eq!(rows[0].success_rate, Some(0.25), "15 of 30 ok now, 10 of 10 before: 5 of 20");
        assert_eq!(rows[0].p50_ms, LatencySketch::quantile_of(&[0, 1], 0.5));
        assert_eq!((rows[1].direction.as_str(), rows[1].requests_per_second), ("v2", 2.0));
        assert_eq!(rows[1].route_json()["rule"], "v2");
    }

    #[test]
    fn a_series_that_restarted_counts_from_zero() {
        let before = totals(&[row("default/web:80", 500, 1.0, 5000, &[500])]);
        let now = totals(&[row("default/web:80", 30, 1.0, 300, &[30])]);
        assert_eq!(rates(&before, &now, 1.0)[0].requests_per_second, 30.0);
    }
}

//! The request rows of `cargo xtask bench`: HTTP/1.1 (wrk), HTTP/2
//! (h2load) and a fixed rate (oha) through each request path, the CPU the
//! proxies spent per request, and a verdict per row against its target
//! (BENCHMARKS.md, "Targets").

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use mesh_tests::Cluster;

use super::{cpu_of, median, parse_wrk, say};

/// The rate of the fixed-rate latency measurement, requests/s.
pub const FIXED_RATE: u32 = 1000;

/// One request path: where wrk and oha (HTTP/1.1) and h2load (HTTP/2)
/// send their requests, and the proxies that serve them (none for
/// `http-direct`).
pub struct Path {
    pub name: &'static str,
    h1: String,
    h2: String,
    pids: Vec<u32>,
}

impl Path {
    pub fn new(name: &'static str, h1: impl Into<String>, h2: impl Into<String>, pids: Vec<u32>) -> Self {
        Self { name, h1: h1.into(), h2: h2.into(), pids }
    }
}

/// One request path's figures.
#[derive(Debug, Clone)]
pub struct HttpRow {
    pub name: &'static str,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub h2_rps: f64,
    /// oha at a fixed rate of [`FIXED_RATE`] requests/s.
    pub fixed_p50_us: f64,
    pub fixed_p99_us: f64,
    /// The proxies' CPU seconds over all three measurements.
    pub cpu_s: f64,
    /// The proxies' CPU microseconds per request wrk (HTTP/1.1) and
    /// h2load (HTTP/2) completed, over their runs only; 0 without a proxy.
    pub h1_cpu_us: f64,
    pub h2_cpu_us: f64,
}

/// Every selected path, `rounds` times, interleaved as the L4 rows are;
/// each figure the median over the rounds.
pub fn measure(
    c: &Cluster,
    paths: &[&Path],
    secs: u64,
    rounds: usize,
    socket_errors: &mut Vec<String>,
) -> anyhow::Result<Vec<HttpRow>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let oha = crate::setup::oha_path()
        .context("oha is missing (the fixed-rate latency needs it): run cargo xtask setup")?
        .display()
        .to_string();
    let wait = Duration::from_secs(secs + 30);
    let mut runs: Vec<Vec<HttpRow>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        let n = paths.len();
        for i in (0..n).map(|k| (k + round - 1) % n) {
            let Path { name, h1, h2, pids } = paths[i];
            say(&format!("{name} (round {round} of {rounds}): HTTP/1.1 keep-alive, HTTP/2 ({secs} s each)"));
            let d = format!("{secs}s");
            let cpu0 = cpu_of(pids);
            let ka =
                c.exec("client", "wrk", &["-t1", "-c32", "-d", &d, "--latency", &format!("http://{h1}/")], wait)?;
            let ka = String::from_utf8_lossy(&ka.stdout).into_owned();
            let (rps, p50, p99) = parse_wrk(&ka).with_context(|| format!("{name}: no wrk result:\n{ka}"))?;
            let h1_done = parse_wrk_count(&ka).with_context(|| format!("{name}: no wrk request count:\n{ka}"))?;
            if let Some(e) = ka.lines().find(|l| l.trim_start().starts_with("Socket errors:")) {
                socket_errors.push(format!("{name}, round {round}: {}", e.trim()));
            }
            let cpu1 = cpu_of(pids);
            let h2load = c.exec(
                "client",
                "h2load",
                &["-c", "4", "-m", "32", "-D", &secs.to_string(), &format!("http://{h2}/")],
                wait,
            )?;
            let h2out = String::from_utf8_lossy(&h2load.stdout).into_owned();
            let (h2_rps, h2_done) = parse_h2load(&h2out).with_context(|| format!("{name}: h2load failed:\n{h2out}"))?;
            let cpu2 = cpu_of(pids);
            let rate = FIXED_RATE.to_string();
            let url = format!("http://{h1}/");
            let fixed = c.exec(
                "client",
                &oha,
                &[
                    "-z",
                    &d,
                    "-q",
                    &rate,
                    "-c",
                    "8",
                    "--latency-correction",
                    "--no-tui",
                    "--output-format",
                    "json",
                    &url,
                ],
                wait,
            )?;
            let fixed = String::from_utf8_lossy(&fixed.stdout).into_owned();
            let (fixed_p50_us, fixed_p99_us) =
                parse_oha(&fixed).with_context(|| format!("{name}: oha failed or had failures:\n{fixed}"))?;
            let per = |cpu: f64, done: f64| if done > 0.0 { cpu * 1e6 / done } else { 0.0 };
            let row = HttpRow {
                name,
                rps,
                p50_us: p50,
                p99_us: p99,
                h2_rps,
                fixed_p50_us,
                fixed_p99_us,
                cpu_s: cpu_of(pids) - cpu0,
                h1_cpu_us: per(cpu1 - cpu0, h1_done),
                h2_cpu_us: per(cpu2 - cpu1, h2_done),
            };
            say(&format!(
                "  HTTP/1.1 {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {:.1} CPU us/req; HTTP/2 {:.0} req/s, {:.1} CPU us/req; at {FIXED_RATE}/s p50 {:.0} us, p99 {:.0} us; CPU {:.2} s",
                row.rps, row.p50_us, row.p99_us, row.h1_cpu_us, row.h2_rps, row.h2_cpu_us, row.fixed_p50_us, row.fixed_p99_us, row.cpu_s
            ));
            runs[i].push(row);
        }
    }
    Ok(runs.iter().map(|r| median_http_row(r)).collect())
}

/// (p50 µs, p99 µs) from oha's JSON output, when every request succeeded.
fn parse_oha(out: &str) -> Option<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(out).ok()?;
    if v["summary"]["successRate"].as_f64()? < 1.0 {
        return None;
    }
    let p = &v["latencyPercentiles"];
    Some((p["p50"].as_f64()? * 1e6, p["p99"].as_f64()? * 1e6))
}

/// (requests/s, requests that succeeded) from h2load's `finished in
/// 5.00s, 12345.67 req/s, ...` and `requests: ...` lines, if every request
/// succeeded.
fn parse_h2load(out: &str) -> Option<(f64, f64)> {
    let done = out.lines().find(|l| l.starts_with("requests:"))?;
    if !done.contains(" 0 failed, 0 errored") {
        return None;
    }
    let succeeded = done.split(',').find_map(|f| f.trim().strip_suffix(" succeeded")?.parse().ok())?;
    let line = out.lines().find(|l| l.starts_with("finished in"))?;
    Some((line.split(',').nth(1)?.trim().strip_suffix(" req/s")?.parse().ok()?, succeeded))
}

/// The requests wrk completed, from `  123456 requests in 5.00s, ...`.
fn parse_wrk_count(out: &str) -> Option<f64> {
    out.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.trim().parse().ok())
}

fn median_http_row(runs: &[HttpRow]) -> HttpRow {
    let med = |f: fn(&HttpRow) -> f64| median(runs.iter().map(f).collect());
    HttpRow {
        name: runs[0].name,
        rps: med(|r| r.rps),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        h2_rps: med(|r| r.h2_rps),
        fixed_p50_us: med(|r| r.fixed_p50_us),
        fixed_p99_us: med(|r| r.fixed_p99_us),
        cpu_s: med(|r| r.cpu_s),
        h1_cpu_us: med(|r| r.h1_cpu_us),
        h2_cpu_us: med(|r| r.h2_cpu_us),
    }
}

/// The peer a request row is compared with: HAProxy logging as the mesh
/// does, or neither logging.
fn peer(name: &str) -> &'static str {
    if name.ends_with("-nolog") {
        "haproxy-http-nolog"
    } else {
        "haproxy-http"
    }
}

/// Hops a request of the row passes through (proxies).
fn hops(name: &str) -> f64 {
    match name {
        "http-direct" => 0.0,
        "http-proxy-mtls" => 2.0,
        _ => 1.0,
    }
}

pub fn render_http(rows: &[HttpRow]) -> String {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let of = |f: fn(&HttpRow) -> f64, name: &str| find(name).map(f).unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "-".into() };
    let cell = |r: &HttpRow, f: fn(&HttpRow) -> f64| {
        let (d, h) = (of(f, "http-direct"), of(f, peer(r.name)));
        format!("{:.0} ({}x direct, {}x {})", f(r), ratio(f(r), d), ratio(f(r), h), peer(r.name))
    };
    let cpu = |r: &HttpRow, f: fn(&HttpRow) -> f64| {
        if hops(r.name) == 0.0 {
            return "-".to_owned();
        }
        format!("{:.1} ({}x {})", f(r), ratio(f(r), of(f, peer(r.name))), peer(r.name))
    };
    let mut s = String::from(
        "\n## Requests\n\nHTTP/1.1: wrk, 32 keep-alive connections. HTTP/2: h2load, 4 connections x 32 streams (prior knowledge). The mesh rows route every request on its own (`appProtocol: http` / `http2`) and write the access log as configured by default (a line per request, to the daemon's log file); haproxy-http is HAProxy `mode http`, one thread, with `option httplog` to its log file (`log stdout`). The `-nolog` rows are the same without access log on either side (`accessLog: off`; no `log` in HAProxy). Each row is divided by `http-direct` and by its peer (haproxy-http, or haproxy-http-nolog for a `-nolog` row). CPU µs per request is the proxies' CPU (both nodes' for http-proxy-mtls) during wrk or h2load over the requests they completed; proxy CPU s is theirs over all three measurements.\n\n",
    );
    let _ = writeln!(
        s,
        "| path | HTTP/1.1 req/s | p50 µs | p99 µs | CPU µs/req | HTTP/2 req/s | CPU µs/req | proxy CPU s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            r.name,
            cell(r, |r| r.rps),
            cell(r, |r| r.p50_us),
            cell(r, |r| r.p99_us),
            cpu(r, |r| r.h1_cpu_us),
            cell(r, |r| r.h2_rps),
            cpu(r, |r| r.h2_cpu_us),
            r.cpu_s
        );
    }
    // What routes and policies cost, against the same service without.
    let local = find("http-proxy-local");
    for (what, row, how) in [
        ("Routing", "http-proxy-routes", "50 HTTPRoutes x 16 rules"),
        ("Authorization", "http-proxy-authz", "20 policies x 10 rules"),
    ] {
        let Some((l, r)) = local.zip(find(row)) else { continue };
        let pct = |a: f64, b: f64| if b > 0.0 { format!("{:+.1}%", (a / b - 1.0) * 100.0) } else { "-".into() };
        let _ = writeln!(
            s,
            "\n{what} cost ({row}, {how} checked per request, against http-proxy-local in the same run): HTTP/1.1 req/s {}, HTTP/2 req/s {}, p50 at {FIXED_RATE} req/s {:+.0} µs.",
            pct(r.rps, l.rps),
            pct(r.h2_rps, l.h2_rps),
            r.fixed_p50_us - l.fixed_p50_us
        );
    }
    let _ = writeln!(
        s,
        "\nAt a fixed {FIXED_RATE} requests/s (oha `-q {FIXED_RATE}`, 8 HTTP/1.1 keep-alive connections, latency-corrected). A hop is one proxy a request passes: one for http-proxy-local and haproxy-http, two for http-proxy-mtls (both nodes' proxies).\n"
    );
    let _ = writeln!(s, "| path | p50 µs | p99 µs | added p50 per hop µs |");
    let _ = writeln!(s, "|---|---|---|---|");
    for r in rows {
        let added = added_per_hop(rows, r).map_or("-".into(), |a| format!("{a:+.0}"));
        let _ = writeln!(s, "| {} | {:.0} | {:.0} | {added} |", r.name, r.fixed_p50_us, r.fixed_p99_us);
    }
    let verdicts = verdicts(rows);
    if !verdicts.is_empty() {
        let _ = writeln!(s, "\n### Verdicts against the targets (BENCHMARKS.md)\n");
        for v in verdicts {
            let _ = writeln!(s, "- {v}");
        }
    }
    s
}

/// The p50 at the fixed rate `r` adds per hop over http-direct's, when
/// both were measured.
fn added_per_hop(rows: &[HttpRow], r: &HttpRow) -> Option<f64> {
    let direct = rows.iter().find(|d| d.name == "http-direct")?.fixed_p50_us;
    (hops(r.name) > 0.0 && direct > 0.0).then(|| (r.fixed_p50_us - direct) / hops(r.name))
}

/// One line per request row with a target: each figure against it, and
/// how many it meets. Rows whose reference was not measured are left out.
pub fn verdicts(rows: &[HttpRow]) -> Vec<String> {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let mut out = Vec::new();
    // (figure, value, target, higher is better)
    let judge = |row: &str, against: &str, checks: Vec<(&str, f64, f64, bool)>| {
        let mut met = 0;
        let parts: Vec<String> = checks
            .iter()
            .map(|(what, v, target, higher)| {
                let ok = if *higher { v >= target } else { v <= target };
                met += usize::from(ok);
                let op = if *higher { "≥" } else { "≤" };
                // Four decimals where two would show the target itself.
                let mut shown = format!("{v:.2}");
                if shown.parse::<f64>().ok() == Some(*target) {
                    shown = format!("{v:.4}");
                }
                format!("{what} {shown}x ({op} {target}x: {})", if ok { "met" } else { "**missed**" })
            })
            .collect();
        format!("**{row}** against {against}: {}; {met} of {} met.", parts.join(", "), checks.len())
    };
    for (mesh, haproxy) in [("http-proxy-local", "haproxy-http"), ("http-proxy-nolog", "haproxy-http-nolog")] {
        let (Some(m), Some(h)) = (find(mesh), find(haproxy)) else { continue };
        let mut checks = vec![
            ("HTTP/1.1 req/s", m.rps / h.rps, 1.0, true),
            ("HTTP/2 req/s", m.h2_rps / h.h2_rps, 1.0, true),
            ("HTTP/1.1 CPU µs/req", m.h1_cpu_us / h.h1_cpu_us, 1.0, false),
            ("HTTP/2 CPU µs/req", m.h2_cpu_us / h.h2_cpu_us, 1.0, false),
            ("HTTP/1.1 p99", m.p99_us / h.p99_us, 1.0, false),
        ];
        if let (Some(am), Some(ah)) = (added_per_hop(rows, m), added_per_hop(rows, h)) {
            checks.push(("added p50 per hop at 1000 req/s", am / ah, 1.0, false));
        }
        let both = if mesh.ends_with("-nolog") { "neither logging" } else { "both logging" };
        out.push(judge(mesh, &format!("{haproxy} ({both})"), checks));
    }
    let Some(local) = find("http-proxy-local") else { return out };
    for (row, target, why) in [
        ("http-proxy-mtls", 0.8, "http-proxy-local (across nodes, through the mTLS tunnel)"),
        ("http-proxy-routes", 0.95, "http-proxy-local (50 routes x 16 rules: within 5%)"),
        ("http-proxy-authz", 0.95, "http-proxy-local (20 policies x 10 rules: within 5%)"),
    ] {
        let Some(r) = find(row) else { continue };
        let checks = vec![
            ("HTTP/1.1 req/s", r.rps / local.rps, target, true),
            ("HTTP/2 req/s", r.h2_rps / local.h2_rps, target, true),
        ];
        out.push(judge(row, why, checks));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_output() {
        let out = "finished in 5.00s, 12345.67 req/s, 1.00MB/s\nrequests: 61728 total, 61728 started, 61728 done, 61728 succeeded, 0 failed, 0 errored, 0 timeout\n";
        assert_eq!(parse_h2load(out), Some((12345.67, 61728.0)));
        let failed = out.replace("0 failed", "3 failed");
        assert_eq!(parse_h2load(&failed), None, "failed requests make no figure");
    }

    #[test]
    fn parses_oha_json() {
        let out = r#"{"summary":{"successRate":1.0},"latencyPercentiles":{"p50":0.000158815,"p99":0.000549096}}"#;
        let (p50, p99) = parse_oha(out).unwrap();
        assert!((p50 - 158.815).abs() < 1e-6 && (p99 - 549.096).abs() < 1e-6);
        let failed = out.replace("1.0", "0.98");
        assert_eq!(parse_oha(&failed), None, "failed requests make no figure");
    }

    #[test]
    fn parses_wrk_request_count() {
        let out = "  Latency Distribution\n     50%  212.00us\n  61234 requests in 5.00s, 7.65MB read\nRequests/sec:  12246.80\n";
        assert_eq!(parse_wrk_count(out), Some(61234.0));
        assert_eq!(parse_wrk_count("nothing"), None);
    }

    fn row(name: &'static str, rps: f64, h2_rps: f64, cpu_us: f64, fixed_p50_us: f64) -> HttpRow {
        HttpRow {
            name,
            rps,
            p50_us: 100.0,
            p99_us: 400.0,
            h2_rps,
            fixed_p50_us,
            fixed_p99_us: 500.0,
            cpu_s: 1.0,
            h1_cpu_us: cpu_us,
            h2_cpu_us: cpu_us,
        }
    }

    #[test]
    fn each_row_is_judged_against_its_own_peer_and_target() {
        let rows = [
            row("http-direct", 90_000.0, 200_000.0, 0.0, 100.0),
            row("http-proxy-local", 50_000.0, 100_000.0, 20.0, 200.0),
            row("haproxy-http", 70_000.0, 150_000.0, 14.0, 180.0),
            row("http-proxy-nolog", 80_000.0, 160_000.0, 12.0, 170.0),
            row("haproxy-http-nolog", 75_000.0, 155_000.0, 13.0, 175.0),
            row("http-proxy-mtls", 30_000.0, 90_000.0, 30.0, 400.0),
            row("http-proxy-authz", 48_000.0, 96_000.0, 21.0, 205.0),
        ];
        let v = verdicts(&rows);
        let line = |n: &str| v.iter().find(|l| l.starts_with(&format!("**{n}**"))).unwrap().clone();
        let local = line("http-proxy-local");
        assert!(local.contains("against haproxy-http (both logging)"), "{local}");
        assert!(local.contains("HTTP/1.1 req/s 0.71x (≥ 1x: **missed**)"), "{local}");
        // Added p50 per hop: 100 µs against HAProxy's 80.
        assert!(local.contains("added p50 per hop at 1000 req/s 1.25x (≤ 1x: **missed**)"), "{local}");
        assert!(local.ends_with("1 of 6 met."), "p99 is equal, so met: {local}");
        let nolog = line("http-proxy-nolog");
        assert!(
            nolog.contains("against haproxy-http-nolog (neither logging)") && nolog.ends_with("6 of 6 met."),
            "{nolog}"
        );
        // mTLS against the same node's row: 0.6x and 0.9x of 0.8x.
        assert!(line("http-proxy-mtls").ends_with("1 of 2 met."), "{v:?}");
        // Authorization within 5%: 0.96x both.
        assert!(line("http-proxy-authz").ends_with("2 of 2 met."), "{v:?}");
        assert!(!v.iter().any(|l| l.contains("http-proxy-routes")), "a row not measured is not judged");
        // 0.9496x of a 0.95x target is not shown as 0.95x.
        let edge = verdicts(&[
            row("http-proxy-local", 100_000.0, 100_000.0, 1.0, 1.0),
            row("http-proxy-authz", 94_960.0, 96_000.0, 1.0, 1.0),
        ]);
        assert!(edge[0].contains("HTTP/1.1 req/s 0.9496x (≥ 0.95x: **missed**)"), "{edge:?}");
        let t = render_http(&rows);
        let nolog_row = t.lines().find(|l| l.starts_with("| http-proxy-nolog |")).unwrap();
        assert!(nolog_row.contains("80000 (0.89x direct, 1.07x haproxy-http-nolog)"), "{nolog_row}");
        assert!(nolog_row.contains("| 12.0 (0.92x haproxy-http-nolog) |"), "{nolog_row}");
        assert!(
            t.lines().any(|l| l.starts_with("| http-direct |") && l.contains("| - |")),
            "no CPU per request without a proxy: {t}"
        );
    }
}

//! The README's figures, made from a full run's results: `cargo xtask
//! bench` writes the same paragraph into `bench/results/latest.md` and the
//! README (between [`BEGIN`] and [`END`]), and `cargo xtask test` fails
//! when the two differ, so the README never quotes figures of another run.

use std::path::Path;

use anyhow::{bail, Context};

use super::requests::HttpRow;
use super::Row;

pub const BEGIN: &str = "<!-- bench-headline: written by cargo xtask bench; the same as in bench/results/latest.md -->";
pub const END: &str = "<!-- /bench-headline -->";

/// The paragraph, from every row of a full run.
pub(super) fn paragraph(rows: &[Row], http: &[HttpRow], held: u64, rss_held: f64) -> String {
    let l4 = |name: &str, f: fn(&Row) -> f64| rows.iter().find(|r| r.name == name).map(f);
    let req = |name: &str, f: fn(&HttpRow) -> f64| http.iter().find(|r| r.name == name).map(f);
    let x = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    };
    let l4x = |a: &str, b: &str, f: fn(&Row) -> f64| x(l4(a, f), l4(b, f));
    let rx = |a: &str, b: &str, f: fn(&HttpRow) -> f64| x(req(a, f), req(b, f));
    format!(
        "In the last full run, on two cores with one worker thread each: kernel mode served {} the requests per second of a direct connection. \
         The node proxy (TCP) served {} HAProxy's keep-alive requests per second and {} its new connections per second, \
         and moved {} its throughput (it splices bulk data in the kernel) at {} its CPU per GB; \
         the daemon held {held} open connections in {rss_held:.1} MiB. \
         Routing every request on its own, with an access-log line per request on both sides, it served {} the requests per second of HAProxy `mode http` on HTTP/1.1 and {} on HTTP/2, \
         at {} and {} its CPU per request; with the access log off on both sides, {} and {} (CPU per request {} and {}). \
         Across nodes, through the mTLS tunnel, requests ran at {} (HTTP/1.1) and {} (HTTP/2) of the same-node rates.",
        l4x("kernel", "direct", |r| r.rps),
        l4x("proxy-local", "haproxy", |r| r.rps),
        l4x("proxy-local", "haproxy", |r| r.conns),
        l4x("proxy-local", "haproxy", |r| r.gbps),
        l4x("proxy-local", "haproxy", |r| r.cpu_per_gb),
        rx("http-proxy-local", "haproxy-http", |r| r.rps),
        rx("http-proxy-local", "haproxy-http", |r| r.h2_rps),
        rx("http-proxy-local", "haproxy-http", |r| r.h1_cpu_us),
        rx("http-proxy-local", "haproxy-http", |r| r.h2_cpu_us),
        rx("http-proxy-nolog", "haproxy-http-nolog", |r| r.rps),
        rx("http-proxy-nolog", "haproxy-http-nolog", |r| r.h2_rps),
        rx("http-proxy-nolog", "haproxy-http-nolog", |r| r.h1_cpu_us),
        rx("http-proxy-nolog", "haproxy-http-nolog", |r| r.h2_cpu_us),
        rx("http-proxy-mtls", "http-proxy-local", |r| r.rps),
        rx("http-proxy-mtls", "http-proxy-local", |r| r.h2_rps),
    )
}

/// `paragraph` between the markers.
pub(super) fn block(paragraph: &str) -> String {
    format!("{BEGIN}\n{paragraph}\n{END}")
}

/// The marked block of `doc`, markers included.
fn find(doc: &str) -> Option<&str> {
    let start = doc.find(BEGIN)?;
    let end = doc[start..].find(END)? + start + END.len();
    Some(&doc[start..end])
}

/// Replaces the README's block with `block`.
pub(super) fn update_readme(root: &Path, block: &str) -> anyhow::Result<()> {
    let path = root.join("README.md");
    let readme = std::fs::read_to_string(&path).context("reading README.md")?;
    let old = find(&readme).with_context(|| format!("README.md has no block between {BEGIN} and {END}"))?;
    std::fs::write(&path, readme.replacen(old, block, 1)).context("writing README.md")
}

/// Fails unless the README's figures are those of bench/results/latest.md.
pub fn check_readme(root: &Path) -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    let latest =
        std::fs::read_to_string(root.join("bench/results/latest.md")).context("reading bench/results/latest.md")?;
    let (Some(r), Some(l)) = (find(&readme), find(&latest)) else {
        bail!("README.md and bench/results/latest.md must both hold the figures between {BEGIN} and {END}: run a full `cargo xtask bench`, which writes both");
    };
    if r != l {
        bail!(
            "README.md quotes other figures than bench/results/latest.md: copy latest.md's block into the README (a full `cargo xtask bench` does)\nREADME:\n{r}\nlatest.md:\n{l}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_block_is_found_replaced_and_compared() {
        let dir = std::env::temp_dir().join(format!("headline-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bench/results")).unwrap();
        let readme = format!("# x\n\nintro\n{}\n\nmore\n", block("old figures"));
        std::fs::write(dir.join("README.md"), &readme).unwrap();
        std::fs::write(dir.join("bench/results/latest.md"), format!("# r\n{}\n| table |\n", block("new figures")))
            .unwrap();
        let e = check_readme(&dir).unwrap_err().to_string();
        assert!(e.contains("README.md quotes other figures") && e.contains("old figures"), "{e}");
        update_readme(&dir, &block("new figures")).unwrap();
        check_readme(&dir).unwrap();
        let after = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(after.starts_with("# x\n\nintro\n") && after.ends_with("\n\nmore\n"), "{after}");
        std::fs::write(dir.join("bench/results/latest.md"), "no block\n").unwrap();
        assert!(check_readme(&dir).unwrap_err().to_string().contains("must both hold"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_paragraph_quotes_each_ratio_and_a_dash_for_a_row_not_measured() {
        let p = paragraph(&[], &[], 1000, 25.04);
        assert!(p.contains("1000 open connections in 25.0 MiB"), "{p}");
        assert!(p.contains("served - the requests per second of a direct connection"), "{p}");
    }
}

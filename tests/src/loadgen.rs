//! Reading what the test clients and backends report: h2load's counts and
//! status classes, and what an mt-http backend says it served.

use std::collections::BTreeMap;

use crate::Cluster;

/// h2load's (succeeded, failed, errored) requests.
pub fn h2load_counts(text: &str) -> (u64, u64, u64) {
    let line = text.lines().find(|l| l.starts_with("requests:")).unwrap_or_default();
    let num = |word: &str| -> u64 {
        line.split(',')
            .find_map(|p| p.trim().strip_suffix(word).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok()))
            .unwrap_or(0)
    };
    (num("succeeded"), num("failed"), num("errored"))
}

/// h2load's answers of status class `class` (`2xx`..`5xx`).
pub fn h2load_status(text: &str, class: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("status codes:"))
        .and_then(|codes| {
            codes.split(',').find_map(|c| c.trim().strip_suffix(&format!(" {class}"))?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What each mt-http backend answers on `path` (`/__count`: `served=N`,
/// `/__cancelled`: `cancelled=N`), asked directly from pod `client`.
pub fn backend_counts(c: &Cluster, client: &str, pods: &[&str], path: &str) -> BTreeMap<String, u64> {
    pods.iter()
        .map(|p| {
            let (code, body) = c.curl(client, &format!("http://{}:8080{path}", c.pod(p).ip)).unwrap();
            assert_eq!(code, 0, "{p}: {body}");
            let n = body
                .trim()
                .split_once('=')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or_else(|| panic!("{p}{path}: {body}"));
            (p.to_string(), n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2load_counts_and_classes() {
        let out = "requests: 3000 total, 3000 started, 3000 done, 2990 succeeded, 10 failed, 0 errored, 0 timeout\n\
                   status codes: 2990 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        assert_eq!(h2load_counts(out), (2990, 10, 0));
        assert_eq!((h2load_status(out, "2xx"), h2load_status(out, "5xx")), (2990, 10));
    }
}

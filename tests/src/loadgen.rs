//! Reading what the test clients and backends report: h2load's counts and
//! status classes, and what an mt-http backend says it served; and judging
//! a weighted split of random picks.

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

/// How far, in standard deviations, a weighted split may stray before a
/// test calls it wrong: the balancer draws every pick at random, so a
/// fixed tolerance fails now and then by chance (60 +- 3 of 1000 picks is
/// under 2 standard deviations: about 1 run in 20). At 4.5 a correct
/// balancer fails about once in 150,000 checks.
pub const SHARE_SIGMAS: f64 = 4.5;

/// Checks that `got` of `n` independent picks fits the share `want`
/// (0..1): within [`SHARE_SIGMAS`] standard deviations of the binomial
/// count. Ok and Err both say the share, the bound and `what`. A test
/// that uses it must pick `n` large enough that the bound tells a right
/// split from a wrong one (see [`share_bound`]).
pub fn check_share(got: u64, n: u64, want: f64, what: &str) -> Result<String, String> {
    let share = got as f64 / n as f64;
    let bound = share_bound(n, want);
    let line = format!(
        "{what}: {got} of {n} is {:.1}%, want {:.1} +- {:.1} ({SHARE_SIGMAS} standard deviations)",
        share * 100.0,
        want * 100.0,
        bound * 100.0
    );
    if (share - want).abs() <= bound {
        Ok(line)
    } else {
        Err(line)
    }
}

/// [`check_share`] that says the share on stderr and panics with `ctx`
/// (what the test saw) when it does not fit.
pub fn assert_share(got: u64, n: u64, want: f64, what: &str, ctx: &dyn std::fmt::Debug) {
    match check_share(got, n, want, what) {
        Ok(line) => eprintln!("{line}"),
        Err(line) => panic!("{line}: {ctx:?}"),
    }
}

/// The largest distance from `want` that [`check_share`] lets a share of
/// `n` picks stray.
pub fn share_bound(n: u64, want: f64) -> f64 {
    SHARE_SIGMAS * (want * (1.0 - want) / n as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weighted_split_is_judged_by_its_binomial_spread() {
        // 3:2 over 2000: +- 4.9 points, so an even split (the weights
        // ignored) or the weights swapped fails.
        assert!((share_bound(2000, 0.6) - 0.0493).abs() < 0.0001);
        assert!(check_share(1200, 2000, 0.6, "right").is_ok());
        assert!(check_share(1120, 2000, 0.6, "chance").is_ok());
        assert!(check_share(1000, 2000, 0.6, "even").is_err());
        assert!(check_share(800, 2000, 0.6, "swapped").is_err());
        // Drawn with the right weights, 1000 runs of 2000 picks all pass.
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..1000 {
            let got = (0..2000).filter(|_| rng.f64() < 0.6).count() as u64;
            check_share(got, 2000, 0.6, "drawn").unwrap();
        }
    }

    #[test]
    fn reads_h2load_counts_and_classes() {
        let out = "requests: 3000 total, 3000 started, 3000 done, 2990 succeeded, 10 failed, 0 errored, 0 timeout\n\
                   status codes: 2990 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        assert_eq!(h2load_counts(out), (2990, 10, 0));
        assert_eq!((h2load_status(out, "2xx"), h2load_status(out, "5xx")), (2990, 10));
    }
}

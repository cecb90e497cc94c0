//! The troubleshooting guide (docs/src/guides/troubleshooting.md) lists
//! every reason the daemon gives: a reason the code gains without a row
//! there fails here.

use crate::identity::binding::Refused;
use crate::proxy::inbound::Deny;
use crate::telemetry::metrics::FAILURE_REASONS;
use crate::tunnel::TLS_FAILURE_REASONS;

#[test]
fn the_troubleshooting_guide_names_every_reason() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/guides/troubleshooting.md");
    let page = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let reasons = FAILURE_REASONS
        .into_iter()
        .chain(TLS_FAILURE_REASONS)
        .chain(Refused::ALL.map(Refused::as_str))
        .chain(Deny::ALL.map(Deny::as_str))
        .chain(["peer_stream_limit"]);
    let missing: Vec<&str> = reasons.filter(|r| !page.contains(&format!("| `{r}`"))).collect();
    assert!(missing.is_empty(), "{path} has no row for {missing:?}: add what each means and what to do");
}

//! Tables and dumps as meshctl prints them.

use serde_json::Value;

use super::Kind;

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn print_list(kind: Kind, v: &Value) {
    let items: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    match kind {
        Kind::Routes | Kind::Policies => unreachable!("printed by route_command"),
        Kind::Nodes => {
            table(&["NAME", "ADDRESS"], items.iter().map(|n| vec![s(&n["name"]), s(&n["address"])]).collect())
        }
        Kind::Workloads => table(
            &["NAMESPACE", "NAME", "NODE", "IP", "SERVICE ACCOUNT", "NETNS"],
            items
                .iter()
                .map(|w| {
                    let netns = if w["netns"].is_null() { format!("pid {}", s(&w["pid"])) } else { s(&w["netns"]) };
                    vec![s(&w["namespace"]), s(&w["name"]), s(&w["node"]), s(&w["ip"]), s(&w["serviceAccount"]), netns]
                })
                .collect(),
        ),
        Kind::Services => table(
            &["NAMESPACE", "NAME", "VIP", "MODE", "PORTS", "ENDPOINTS"],
            items
                .iter()
                .map(|sv| {
                    let ports: Vec<String> = sv["ports"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|p| {
                                    format!(
                                        "{}->{}",
                                        s(&p["port"]),
                                        if p["targetPort"].is_null() { s(&p["port"]) } else { s(&p["targetPort"]) }
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let n = sv["endpoints"].as_array().map_or(0, Vec::len);
                    vec![
                        s(&sv["namespace"]),
                        s(&sv["name"]),
                        s(&sv["vip"]),
                        s(&sv["mode"]),
                        ports.join(","),
                        n.to_string(),
                    ]
                })
                .collect(),
        ),
        Kind::Endpoints => table(
            &[
                "SERVICE",
                "IP",
                "NODE",
                "WEIGHT",
                "EFFECTIVE",
                "PRIORITY",
                "HEALTH",
                "BREAKER",
                "RTT(ms)",
                "IN-FLIGHT",
                "SINCE(s)",
                "REASON",
            ],
            items
                .iter()
                .map(|e| {
                    vec![
                        s(&e["service"]),
                        s(&e["ip"]),
                        s(&e["node"]),
                        s(&e["weight"]),
                        s(&e["effectiveWeight"]),
                        s(&e["priority"]),
                        s(&e["health"]),
                        s(&e["breaker"]),
                        s(&e["ewmaRttMs"]),
                        s(&e["inFlight"]),
                        s(&e["sinceChangeSeconds"]),
                        s(&e["reason"]),
                    ]
                })
                .collect(),
        ),
    }
}

pub fn print_dump(v: &Value) {
    println!("services:");
    let services = v["services"].as_array().cloned().unwrap_or_default();
    table(
        &["  ADDRESS", "ID", "MODE", "GEN", "SLOTS"],
        services
            .iter()
            .map(|sv| {
                let slots = sv["slots"].as_array().cloned().unwrap_or_default();
                let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
                for b in &slots {
                    *counts.entry(s(b)).or_default() += 1;
                }
                let summary = if slots.is_empty() {
                    "-".to_owned()
                } else {
                    counts.iter().map(|(b, n)| format!("{b} x{n}")).collect::<Vec<_>>().join(", ")
                };
                vec![format!("  {}", s(&sv["address"])), s(&sv["id"]), s(&sv["mode"]), s(&sv["generation"]), summary]
            })
            .collect(),
    );
    println!("workloads:");
    let wl = v["workloads"].as_object().cloned().unwrap_or_default();
    table(&["  NETNS COOKIE", "PROXY"], wl.iter().map(|(k, p)| vec![format!("  {k}"), s(p)]).collect());
    println!("counters:");
    let st = v["stats"].as_object().cloned().unwrap_or_default();
    table(&["  NAME", "VALUE"], st.iter().map(|(k, n)| vec![format!("  {k}"), s(n)]).collect());
}

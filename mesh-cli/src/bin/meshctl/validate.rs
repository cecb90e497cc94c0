//! `meshctl validate -f FILE`: a state document checked offline, with the
//! daemon's own parser, validation and map-capacity check, so the same
//! document gets the same verdict and field paths from `meshctl apply`.
//! No daemon is needed.

use std::path::Path;

use anyhow::Context;
use mesh_daemon::model::{self, FieldError, MapCapacity, MapNeeds, State, ValidationErrors};
use serde_json::{json, Value};

/// The verdict on a document: what it holds, or every bad field.
pub fn validate(text: &str, slot_table_size: u32, slot_entries: u32) -> Result<Value, ValidationErrors> {
    let doc = model::parse_document(text).map_err(|e| ValidationErrors(vec![parse_error(&e.0)]))?;
    let state = State::from_document(&doc)?;
    let cap = MapCapacity { slots: slot_entries as usize, ..MapCapacity::with_table_size(slot_table_size) };
    let mut errors = Vec::new();
    for node in &state.nodes {
        if let Err(e) = MapNeeds::of(&state, &node.name, slot_table_size).check(&cap) {
            for f in e.0 {
                let message = format!("on node {}: {}", node.name, f.message);
                if !errors.iter().any(|g: &FieldError| g.path == f.path && g.message == message) {
                    errors.push(FieldError { path: f.path, message });
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(json!({
        "valid": true,
        "nodes": state.nodes.len(),
        "workloads": state.workloads.len(),
        "services": state.services.len(),
        "routes": doc.routes.len(),
        "policies": doc.policies.len(),
    }))
}

/// A parser's error (`services[0].ports[0]: unknown field ...`) as a field
/// error: its path, where it names one, and its message.
fn parse_error(message: &str) -> FieldError {
    let path_like =
        |p: &str| !p.is_empty() && !p.contains(' ') && p.chars().all(|c| c.is_alphanumeric() || "[]._-".contains(c));
    match message.split_once(": ") {
        Some((path, rest)) if path_like(path) => FieldError { path: path.to_owned(), message: rest.to_owned() },
        _ => FieldError { path: String::new(), message: message.to_owned() },
    }
}

/// Runs the command: prints the verdict (a line, or JSON) and says whether
/// the document is valid.
pub fn run(file: &Path, slot_table_size: u32, slot_entries: u32, json_out: bool) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match validate(&text, slot_table_size, slot_entries) {
        Ok(v) => {
            if json_out {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: valid ({} nodes, {} workloads, {} services, {} routes, {} policies)",
                    file.display(),
                    v["nodes"],
                    v["workloads"],
                    v["services"],
                    v["routes"],
                    v["policies"]
                );
            }
            Ok(true)
        }
        Err(errors) => {
            let summary = format!("{} is invalid: {} bad field(s)", file.display(), errors.0.len());
            if json_out {
                let fields: Vec<Value> =
                    errors.0.iter().map(|e| json!({ "path": e.path, "message": e.message })).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "valid": false, "error": summary, "fields": fields }))?
                );
            } else {
                eprintln!("error: {summary}");
                for e in &errors.0 {
                    if e.path.is_empty() {
                        eprintln!("  {}", e.message);
                    } else {
                        eprintln!("  {}: {}", e.path, e.message);
                    }
                }
            }
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "nodes: [{ name: node-a, address: 172.18.0.2 }]\n\
        services:\n  - name: web\n    vip: 10.96.0.10\n    ports: [{ port: 80, targetPort: 8080 }]\n    \
        endpoints: [{ ip: 10.244.1.4, node: node-a, weight: 1 }]\n";

    #[test]
    fn a_valid_document_is_counted() {
        let v = validate(DOC, 256, 262_144).unwrap();
        assert_eq!((v["nodes"].as_u64(), v["services"].as_u64()), (Some(1), Some(1)));
    }

    #[test]
    fn a_typo_names_its_field_path() {
        let e = validate(&DOC.replace("targetPort", "targetPrt"), 256, 262_144).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].path, "services[0].ports[0]");
        assert!(e.0[0].message.starts_with("unknown field `targetPrt`"), "{e}");
    }

    #[test]
    fn every_bad_value_is_named_as_the_daemon_names_it() {
        let bad = DOC.replace("10.244.1.4", "10.244.1.300").replace("weight: 1", "weight: 70000");
        let e = validate(&bad, 256, 262_144).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|f| f.path.as_str()).collect();
        assert!(paths.contains(&"services[0].endpoints[0].ip"), "{e}");
        // The same errors as the daemon's own loader (mesh-daemon check).
        let doc = model::parse_document(&bad);
        match doc {
            Ok(d) => assert_eq!(State::from_document(&d).unwrap_err(), e),
            Err(p) => assert_eq!(parse_error(&p.0), e.0[0]),
        }
    }

    #[test]
    fn a_state_over_the_kernel_maps_is_refused_with_the_flag_that_sizes_them() {
        let kernel = DOC.replace("    ports:", "    mode: kernel\n    ports:");
        validate(&kernel, 256, 262_144).unwrap();
        let e = validate(&kernel, 256, 1).unwrap_err();
        assert!(e.to_string().contains("on node node-a"), "{e}");
    }
}

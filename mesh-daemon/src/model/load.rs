//! Reading a document from YAML or JSON text (JSON is YAML).

use std::path::{Path, PathBuf};

use super::{Document, Invalid, State, ValidationErrors};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not a valid document: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} is invalid:\n{errors}")]
    Invalid { path: PathBuf, errors: ValidationErrors },
}

/// Parses YAML or JSON; a structural error names the field's path
/// (`services[0].ports[0]: unknown field `prot``), as serde_yaml reports it.
pub fn parse_document(text: &str) -> Result<Document, Invalid> {
    serde_yaml::from_str(text).map_err(|e| Invalid(e.to_string()))
}

/// The JSON Schema of the state document (`--config`, `meshctl apply`),
/// made from the document's types: field names, types, required fields,
/// unknown fields refused, and each field's doc comment as its
/// description. Editors validate with it (a yaml-language-server
/// modeline); what it cannot say (addresses, ranges, references between
/// items) the daemon's validation still checks.
pub fn schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Document)).unwrap_or_default();
    if let Some(o) = schema.as_object_mut() {
        o.insert("title".into(), "mesh state document".into());
    }
    schema
}

/// Reads, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<State, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let doc = parse_document(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.0 })?;
    State::from_document(&doc).map_err(|errors| ConfigError::Invalid { path: path.to_owned(), errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structural_errors_name_the_field() {
        let e = parse_document("services:\n  - name: web\n    vip: 10.0.0.1\n    ports: [{ port: 80, prot: 1 }]\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("services[0].ports[0]: unknown field `prot`"), "{e}");
        let e = parse_document(
            "nodes: [{ name: a, address: 1.2.3.4 }]\nservices: [{ name: w, vip: 1.1.1.1, ports: [{port: x}] }]",
        )
        .unwrap_err()
        .0;
        assert!(e.starts_with("services[0].ports[0].port: invalid type"), "{e}");
    }

    #[test]
    fn json_is_accepted() {
        let d = parse_document(r#"{"nodes":[{"name":"a","address":"1.2.3.4"}]}"#).unwrap();
        assert_eq!(d.nodes[0].name, "a");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mesh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.yaml");
        let e = load_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.yaml") && e.contains("cannot read config"), "{e}");
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "nodes: [{ name: a, address: 300.1.1.1 }]").unwrap();
        let e = load_file(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.yaml is invalid")
                && e.contains("nodes[0].address: \"300.1.1.1\" is not an IP address (IPv4 or IPv6)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

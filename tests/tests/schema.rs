//! The state document's JSON Schema (`deploy/schema/mesh.schema.json`,
//! written by `cargo xtask docs` from the document's types), checked by a
//! standard validator (the `jsonschema` PyPI package, which `cargo xtask
//! setup` brings with kubernetes-validate) against `meshctl validate`: a
//! document both accept, and a typo'd field both name at the same path.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn meshctl() -> PathBuf {
    mesh_tests::cluster::Bins::locate().expect("the binaries are built (cargo xtask test builds them)").meshctl
}

/// What the `jsonschema` package says of `doc`: the path of each error as
/// `a[0].b`, and its message (the most specific one, as its `best_match`
/// picks).
fn jsonschema_errors(doc: &Path) -> Vec<(String, String)> {
    let script = r#"
import json, sys
try:
    import jsonschema, yaml
except ImportError as e:
    sys.exit(f"missing Python package: {e}; run cargo xtask setup")
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open(sys.argv[2]))
v = jsonschema.validators.validator_for(schema)(schema)
# An optional field's error is "not valid under any of the given
# schemas" (null, or the object): best_match names the object's own.
errors = [jsonschema.exceptions.best_match([e]) for e in v.iter_errors(doc)]
for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
    path = ""
    for p in e.absolute_path:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else p)
    print(f"{path}\t{e.message}")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(root().join("deploy/schema/mesh.schema.json"))
        .arg(doc)
        .output()
        .expect("python3");
    assert!(out.status.success(), "jsonschema: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, m)| (p.to_owned(), m.to_owned()))
        .collect()
}

/// What `meshctl validate -o json` says of `doc`: (valid, [(path, message)]).
fn meshctl_validate(doc: &Path) -> (bool, Vec<(String, String)>) {
    let out = Command::new(meshctl()).args(["-o", "json", "validate", "-f"]).arg(doc).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("meshctl validate -o json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let fields = v["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| (f["path"].as_str().unwrap().to_owned(), f["message"].as_str().unwrap().to_owned()))
        .collect();
    (out.status.success() && v["valid"] == true, fields)
}

const DOC: &str = "\
nodes:
  - { name: node-a, address: 172.18.0.2 }
workloads:
  - { name: client, node: node-a, ip: 10.244.1.2, netns: /var/run/netns/client }
services:
  - name: web
    vip: 10.96.0.10
    mode: proxy
    ports: [{ port: 80, targetPort: 8080, appProtocol: http }]
    endpoints:
      - { ip: 10.244.1.4, node: node-a, weight: 3 }
      - { ip: 10.244.1.5, node: node-a, weight: 1 }
    http:
      timeout: 2s
      retries: { attempts: 2, retryOn: [connect-failure, \"503\"] }
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web-split }
    spec:
      parentRefs: [{ group: \"\", kind: Service, name: web, port: 80 }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /v2 } }]
          backendRefs: [{ name: web, port: 80 }]
";

#[test]
fn the_schema_and_meshctl_validate_agree_on_a_good_document_and_a_typo() {
    let dir = std::env::temp_dir().join(format!("mesh-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Removed when the test ends, passed or failed.
    struct Removed<'a>(&'a std::path::Path);
    impl Drop for Removed<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _removed = Removed(&dir);
    let good = dir.join("good.yaml");
    std::fs::write(&good, DOC).unwrap();
    assert_eq!(meshctl_validate(&good), (true, vec![]), "meshctl validate accepts the document");
    assert_eq!(jsonschema_errors(&good), vec![], "the schema accepts the document");

    for (typo, path) in [
        ("targetPort: 8080", "services[0].ports[0]"),
        ("weight: 3", "services[0].endpoints[0]"),
        ("timeout: 2s", "services[0].http"),
        ("backendRefs:", "routes[0].spec.rules[0]"),
    ] {
        let (field, rest) = typo.split_once(':').unwrap();
        let bad = dir.join("typo.yaml");
        std::fs::write(&bad, DOC.replacen(typo, &format!("{field}x:{rest}"), 1)).unwrap();
        let (valid, fields) = meshctl_validate(&bad);
        assert!(!valid, "meshctl validate refuses {field}x");
        assert_eq!(fields.len(), 1, "{fields:?}");
        assert_eq!(fields[0].0, path, "meshctl names the typo's object: {fields:?}");
        assert!(fields[0].1.contains(&format!("unknown field `{field}x`")), "{fields:?}");
        let errors = jsonschema_errors(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, path, "the schema's validator names the same path: {errors:?}");
        assert!(errors[0].1.contains(&format!("'{field}x' was unexpected")), "{errors:?}");
    }
}

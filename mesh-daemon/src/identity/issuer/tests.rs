use super::*;

const STATE: &str = "nodes: [{name: a, address: 172.18.0.2}, {name: b, address: 172.18.0.3}]\n\
             workloads: [{name: web-a, serviceAccount: web, node: a, ip: 10.244.1.3, pid: 1},\n\
             \x20 {name: db-b, serviceAccount: db, node: b, ip: 10.244.2.3, pid: 1}]\n";

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

#[tokio::test]
async fn a_node_may_hold_its_own_identity_and_those_of_its_workloads_only() {
    let dir = std::env::temp_dir().join(format!("mesh-issuer-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, STATE).unwrap();
    let authority = Authority::tokens(dir.join("none.json"), path);
    let td = "cluster.local";
    let on_a = authority.placed("a", &id("spiffe://cluster.local/ns/default/sa/web")).await.ok().unwrap();
    assert_eq!(on_a, [("default".to_owned(), "web".to_owned())], "the state's workloads on node a");
    assert_eq!(authorize(td, "a", &id("spiffe://cluster.local/ns/mesh-system/node/a"), &[]), Ok(()));
    assert_eq!(authorize(td, "a", &id("spiffe://cluster.local/ns/default/sa/web"), &on_a), Ok(()));
    assert_eq!(authorize(td, "a", &id("spiffe://cluster.local/ns/mesh-system/node/b"), &on_a), Err(Refused::OtherNode));
    assert_eq!(authorize(td, "a", &id("spiffe://cluster.local/ns/default/sa/db"), &on_a), Err(Refused::NotOnNode));
    assert_eq!(authorize(td, "a", &id("spiffe://other.domain/ns/default/sa/web"), &on_a), Err(Refused::BadIdentity));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_issuer_address_is_a_host_and_a_port() {
    for ok in ["10.0.0.5:15012", "mesh-issuer.mesh-system.svc:15012", "localhost:1"] {
        assert_eq!(host_port(ok).unwrap(), ok);
    }
    for bad in ["10.0.0.5", ":15012", "host:0", "host:99999", "a b:1", "[::1]:15012"] {
        assert!(host_port(bad).unwrap_err().to_string().contains("give HOST:PORT"), "{bad}");
    }
}

#[test]
fn a_token_is_known_only_by_its_hash_and_names_one_node() {
    let dir = std::env::temp_dir().join(format!("mesh-issuer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("creds.json");
    let ta = Credentials::bootstrap(&path, &NodeName::parse("a").unwrap()).unwrap();
    let tb = Credentials::bootstrap(&path, &NodeName::parse("b").unwrap()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&ta) && !text.contains(&tb), "only hashes are stored");
    let c = Credentials::load(&path).unwrap();
    assert_eq!((c.node_of(&ta), c.node_of(&tb), c.node_of("guess")), (Some("a"), Some("b"), None));
    std::fs::remove_dir_all(&dir).unwrap();
}

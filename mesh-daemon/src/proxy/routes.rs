//! What the proxy needs from the state, indexed for the accept path: the
//! service port behind each kernel service id, its endpoints, and the
//! workloads by IP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use crate::balance::RoundRobin;
use crate::model::{Frontend, State};

#[derive(Debug)]
pub struct Route {
    /// `namespace/name:port`, for logs.
    pub name: String,
    /// Endpoints that take new connections (weight above 0), with the
    /// target port.
    pub endpoints: Vec<SocketAddrV4>,
    rr: RoundRobin,
}

impl Route {
    pub fn pick(&self) -> Option<SocketAddrV4> {
        self.rr
            .pick(self.endpoints.len())
            .map(|i| self.endpoints[i])
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    by_id: HashMap<u32, Arc<Route>>,
    /// `namespace/name` of each workload, by IP.
    workloads: HashMap<Ipv4Addr, String>,
}

impl RouteTable {
    pub fn build(state: &State, frontends: &[Frontend]) -> Self {
        let by_id = frontends
            .iter()
            .map(|f| {
                let s = &state.services[f.service];
                let endpoints = s
                    .endpoints
                    .iter()
                    .filter(|e| e.weight.0 > 0)
                    .map(|e| e.addr(f.target_port))
                    .collect();
                let route = Route {
                    name: format!("{}:{}", s.key(), f.port),
                    endpoints,
                    rr: RoundRobin::default(),
                };
                (f.id, Arc::new(route))
            })
            .collect();
        let workloads = state
            .workloads
            .iter()
            .map(|w| (w.ip, format!("{}/{}", w.namespace, w.name)))
            .collect();
        Self { by_id, workloads }
    }

    pub fn route(&self, id: u32) -> Option<&Arc<Route>> {
        self.by_id.get(&id)
    }

    pub fn workload(&self, ip: Ipv4Addr) -> Option<&str> {
        self.workloads.get(&ip).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;

    #[test]
    fn drained_endpoints_get_no_connections() {
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - name: web\n   vip: 10.96.0.10\n   ports: [{port: 80, targetPort: 8080}]\n   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a, weight: 0}]\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        let ids = crate::model::ServiceIds::default().assign(&state.frontend_keys());
        let t = RouteTable::build(&state, &state.frontends(&ids));
        let r = t.route(1).unwrap();
        assert_eq!(r.name, "default/web:80");
        for _ in 0..4 {
            assert_eq!(r.pick(), Some("10.0.0.1:8080".parse().unwrap()));
        }
        assert!(t.route(2).is_none());
    }
}

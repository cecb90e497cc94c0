//! The map contents a state calls for: pure, so it is tested without a kernel.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use mesh_common::{ServiceKey, ServiceValue, WorkloadValue, IPPROTO_TCP, MODE_PROXY};

use crate::model::{Frontend, Mode, State};

#[derive(Debug, Default, Clone, PartialEq)]
pub struct MapContents {
    pub workloads: BTreeMap<u64, WorkloadValue>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
}

impl MapContents {
    /// `cookies`: the netns cookie of each enrolled workload of this node;
    /// `proxy`: where their redirected connections go.
    pub fn build(
        state: &State,
        frontends: &[Frontend],
        cookies: &[u64],
        proxy: SocketAddrV4,
    ) -> Self {
        let wl = WorkloadValue {
            proxy_ip_be: u32::from(*proxy.ip()).to_be(),
            proxy_port_be: proxy.port().to_be(),
            flags: 0,
        };
        let workloads = cookies.iter().map(|c| (*c, wl)).collect();
        let services = frontends
            .iter()
            .map(|f| {
                let key = ServiceKey {
                    vip_be: u32::from(f.vip).to_be(),
                    port_be: f.port.0.to_be(),
                    proto: IPPROTO_TCP,
                    _pad: 0,
                };
                let mode = match state.services[f.service].mode {
                    Mode::Proxy => MODE_PROXY,
                };
                (
                    key,
                    ServiceValue {
                        id: f.id,
                        mode,
                        generation: 0,
                        _pad: 0,
                        slot_count: 0,
                        _pad2: 0,
                    },
                )
            })
            .collect();
        Self {
            workloads,
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_document, State};

    #[test]
    fn one_entry_per_service_port_in_network_order() {
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}, {port: 443}]}\n - {name: db, vip: 10.96.0.20, ports: [{port: 5432}]}\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        let f = state.frontends();
        let c = MapContents::build(&state, &f, &[7, 9], "172.18.0.2:15001".parse().unwrap());
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.workloads[&7].proxy_port_be, 15001u16.to_be());
        assert_eq!(
            c.workloads[&7].proxy_ip_be,
            u32::from_be_bytes([172, 18, 0, 2]).to_be()
        );
        assert_eq!(c.services.len(), 3);
        let key = ServiceKey {
            vip_be: u32::from_be_bytes([10, 96, 0, 10]).to_be(),
            port_be: 443u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        let v = c.services[&key];
        // ids follow (namespace, name, port): db:5432=1, web:80=2, web:443=3
        assert_eq!(v.id, 3);
        assert_eq!(v.mode, MODE_PROXY);
    }
}

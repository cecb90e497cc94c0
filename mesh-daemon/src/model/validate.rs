//! Document -> State, collecting every error with the path of its field.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// One bad field: `services[1].endpoints[0].ip: "10.0.0.300" is not an IPv4 address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every bad field of a document, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<FieldError>);

impl Errors {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
    /// Keeps the value of `r`, or records its error under `path`. The
    /// path is made only on error: a valid state of 100 000 endpoints
    /// formats none.
    pub(super) fn take<T>(&mut self, path: impl FnOnce() -> String, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.push(path(), m)).ok()
    }
}

fn bounded_duration(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!("{s} is not between {min:?} and {max:?}"));
    }
    Ok(d)
}

/// `Some(None)`: checks off; `None`: an error was recorded.
fn health_check(e: &mut Errors, service: &str, doc: Option<&HealthCheckDoc>) -> Option<Option<HealthCheck>> {
    let p = format!("{service}.healthCheck");
    let default =
        HealthCheckDoc { protocol: "tcp".into(), path: None, interval: None, timeout: None, rise: None, fall: None };
    let doc = doc.unwrap_or(&default);
    let kind = match (doc.protocol.as_str(), &doc.path) {
        ("none", _) => return Some(None),
        ("tcp", None) => Some(CheckKind::Tcp),
        ("tcp", Some(_)) => {
            e.push(format!("{p}.path"), "a tcp check has no path; use protocol: http");
            None
        }
        ("http", Some(path)) if path.starts_with('/') => Some(CheckKind::Http(path.clone())),
        ("http", Some(path)) => {
            e.push(format!("{p}.path"), format!("{path:?} must start with '/'"));
            None
        }
        ("http", None) => Some(CheckKind::Http("/".into())),
        (other, _) => {
            e.push(format!("{p}.protocol"), format!("{other:?} is not a check: use \"tcp\", \"http\" or \"none\""));
            None
        }
    };
    let interval = e.take(
        || format!("{p}.interval"),
        bounded_duration(
            doc.interval.as_deref().unwrap_or("5s"),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
    );
    let timeout = e.take(
        || format!("{p}.timeout"),
        bounded_duration(doc.timeout.as_deref().unwrap_or("1s"), Duration::from_millis(10), Duration::from_secs(60)),
    );
    if let (Some(i), Some(t)) = (interval, timeout) {
        if t > i {
            e.push(format!("{p}.timeout"), format!("{t:?} is longer than the interval {i:?}"));
            return None;
        }
    }
    let count = |e: &mut Errors, field: &str, v: Option<i64>, default: u32| {
        e.take(
            || format!("{p}.{field}"),
            match v.unwrap_or(i64::from(default)) {
                n @ 1..=100 => Ok(n as u32),
                n => Err(format!("{n} is not in 1..100")),
            },
        )
    };
    let rise = count(e, "rise", doc.rise, 2);
    let fall = count(e, "fall", doc.fall, 3);
    Some(Some(HealthCheck { kind: kind?, interval: interval?, timeout: timeout?, rise: rise?, fall: fall? }))
}

fn ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IPv4 address"))
}

pub(super) fn validate(doc: &Document) -> Result<State, ValidationErrors> {
    let mut e = Errors::default();
    let mut state = State::default();

    let mut node_names = HashSet::new();
    // First holder of each address, for refusing a VIP that shadows it.
    let mut node_addrs = HashMap::new();
    let mut endpoint_ips: HashMap<Ipv4Addr, (usize, usize)> = HashMap::new();
    let mut vips = Vec::new();
    for (i, n) in doc.nodes.iter().enumerate() {
        let p = format!("nodes[{i}]");
        let name = e.take(|| format!("{p}.name"), NodeName::parse(&n.name));
        if let Some(name) = &name {
            if !node_names.insert(name.clone()) {
                e.push(format!("{p}.name"), format!("node \"{name}\" is listed twice"));
            }
        }
        let address = e.take(|| format!("{p}.address"), ipv4(&n.address));
        if let Some(a) = address {
            node_addrs.entry(a).or_insert(i);
        }
        if let (Some(name), Some(address)) = (name, address) {
            state.nodes.push(Node { name, address });
        }
    }
    let known_node = |e: &mut Errors, path: &dyn Fn() -> String, s: &str| -> Option<NodeName> {
        let name = e.take(path, NodeName::parse(s))?;
        if node_names.contains(&name) {
            Some(name)
        } else {
            e.push(path(), format!("node {s:?} is not in `nodes`; add it there or fix the name"));
            None
        }
    };

    let mut workload_ips = HashMap::new();
    for (i, w) in doc.workloads.iter().enumerate() {
        let p = format!("workloads[{i}]");
        let name = e.take(|| format!("{p}.name"), Name::parse(&w.name));
        let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&w.namespace));
        let sa = e.take(|| format!("{p}.serviceAccount"), Name::parse(&w.service_account));
        let node = known_node(&mut e, &|| format!("{p}.node"), &w.node);
        let ip = e.take(|| format!("{p}.ip"), ipv4(&w.ip));
        if let Some(ip) = ip {
            if let Some(first) = workload_ips.insert(ip, i) {
                e.push(format!("{p}.ip"), format!("{ip} is already the address of workloads[{first}]"));
            }
        }
        let netns = match (&w.netns, w.pid) {
            (Some(path), None) if path.starts_with('/') => Some(NetnsRef::Path(PathBuf::from(path))),
            (Some(path), None) => {
                e.push(format!("{p}.netns"), format!("{path:?} is not an absolute path"));
                None
            }
            (None, Some(pid)) => e.take(
                || format!("{p}.pid"),
                u32::try_from(pid)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(NetnsRef::Pid)
                    .ok_or_else(|| format!("{pid} is not a process id")),
            ),
            (None, None) => {
                e.push(p.clone(), "give `netns` (a path) or `pid` to find the pod's network namespace");
                None
            }
            (Some(_), Some(_)) => {
                e.push(p.clone(), "give either `netns` or `pid`, not both");
                None
            }
        };
        if let (Some(name), Some(namespace), Some(service_account), Some(node), Some(ip), Some(netns)) =
            (name, namespace, sa, node, ip, netns)
        {
            state.workloads.push(Workload { name, namespace, service_account, node, ip, netns });
        }
    }

    let mut service_names = HashMap::new();
    let mut addresses = HashMap::new();
    for (i, s) in doc.services.iter().enumerate() {
        let p = format!("services[{i}]");
        let name = e.take(|| format!("{p}.name"), Name::parse(&s.name));
        let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&s.namespace));
        if let (Some(name), Some(namespace)) = (&name, &namespace) {
            if let Some(first) = service_names.insert((namespace.clone(), name.clone()), i) {
                e.push(format!("{p}.name"), format!("service {namespace}/{name} is already services[{first}]"));
            }
        }
        let vip = e.take(|| format!("{p}.vip"), ipv4(&s.vip));
        if let Some(v) = vip {
            vips.push((i, v));
        }
        let mode = match s.mode.as_str() {
            "proxy" => Some(Mode::Proxy),
            "kernel" => Some(Mode::Kernel),
            other => {
                e.push(format!("{p}.mode"), format!("{other:?} is not a mode: use \"proxy\" or \"kernel\""));
                None
            }
        };
        if s.ports.is_empty() {
            e.push(format!("{p}.ports"), "a service needs at least one port");
        }
        let mut ports = Vec::new();
        let mut seen_ports = HashSet::new();
        for (j, port) in s.ports.iter().enumerate() {
            let pp = format!("{p}.ports[{j}]");
            let number = e.take(|| format!("{pp}.port"), Port::parse(port.port));
            let target = e.take(|| format!("{pp}.targetPort"), Port::parse(port.target_port.unwrap_or(port.port)));
            if port.protocol != "TCP" {
                e.push(format!("{pp}.protocol"), format!("{:?} is not supported: use \"TCP\"", port.protocol));
            }
            if let Some(number) = number {
                if !seen_ports.insert(number) {
                    e.push(format!("{pp}.port"), format!("port {number} is listed twice"));
                } else if let Some(vip) = vip {
                    if let Some(first) = addresses.insert((vip, number), i) {
                        e.push(format!("{pp}.port"), format!("{vip}:{number} is already served by services[{first}]"));
                    }
                }
            }
            let app_protocol = e.take(
                || format!("{pp}.appProtocol"),
                AppProtocol::parse(port.app_protocol.as_deref().unwrap_or("tcp")),
            );
            if let (Some(app), Some(Mode::Kernel)) = (app_protocol, mode) {
                if app.is_requests() {
                    e.push(
                        format!("{pp}.appProtocol"),
                        format!(
                            "{:?} needs {p}.mode: proxy, not kernel: the kernel balances connections and cannot see requests",
                            app.as_str()
                        ),
                    );
                }
            }
            if let (Some(port), Some(target_port), Some(app_protocol)) = (number, target, app_protocol) {
                ports.push(ServicePort { port, target_port, app_protocol });
            }
        }
        let mut endpoints = Vec::new();
        let mut seen_ips = HashSet::new();
        for (j, ep) in s.endpoints.iter().enumerate() {
            let pp = || format!("{p}.endpoints[{j}]");
            let ip = e.take(|| format!("{}.ip", pp()), ipv4(&ep.ip));
            if let Some(ip) = ip {
                if !seen_ips.insert(ip) {
                    e.push(format!("{}.ip", pp()), format!("endpoint {ip} is listed twice"));
                }
                endpoint_ips.entry(ip).or_insert((i, j));
            }
            let node = known_node(&mut e, &|| format!("{}.node", pp()), &ep.node);
            let weight = e.take(
                || format!("{}.weight", pp()),
                match ep.weight {
                    w if w < 0 => Err(format!("weight {w} is negative: use 0 (drain) to {}", Weight::MAX)),
                    w if w > Weight::MAX => Err(format!("weight {w} is above the maximum {}", Weight::MAX)),
                    w => Ok(Weight(w as u16)),
                },
            );
            let priority = e.take(
                || format!("{}.priority", pp()),
                u8::try_from(ep.priority)
                    .map_err(|_| format!("priority {} is not in 0..255 (0 is the most preferred)", ep.priority)),
            );
            if let (Some(ip), Some(node), Some(weight), Some(priority)) = (ip, node, weight, priority) {
                endpoints.push(Endpoint { ip, node, weight, priority });
            }
        }
        let health_check = health_check(&mut e, &p, s.health_check.as_ref());
        let connect_timeout = e.take(
            || format!("{p}.connectTimeout"),
            bounded_duration(
                s.connect_timeout.as_deref().unwrap_or("1s"),
                Duration::from_millis(10),
                Duration::from_secs(60),
            ),
        );
        let retry_budget = e.take(
            || format!("{p}.retryBudget"),
            bounded_duration(
                s.retry_budget.as_deref().unwrap_or("5s"),
                Duration::from_millis(10),
                Duration::from_secs(300),
            ),
        );
        let mtls = match s.mtls.as_deref().unwrap_or("required") {
            "required" => Some(true),
            "disabled" => Some(false),
            other => {
                e.push(format!("{p}.mtls"), format!("{other:?} is not an mTLS mode: use \"required\" or \"disabled\""));
                None
            }
        };
        let authorization = s.authorization.as_ref().map(|a| {
            let identities: Vec<_> = a
                .identities
                .iter()
                .enumerate()
                .filter_map(|(j, id)| {
                    let r = crate::identity::Identity::parse(id).map_err(|x| x.to_string());
                    e.take(|| format!("{p}.authorization.identities[{j}]"), r)
                })
                .collect();
            let namespaces: Vec<_> = a
                .namespaces
                .iter()
                .enumerate()
                .filter_map(|(j, n)| e.take(|| format!("{p}.authorization.namespaces[{j}]"), Name::parse(n)))
                .collect();
            Authorization { identities, namespaces }
        });
        let retries = e.take(
            || format!("{p}.retries"),
            match s.retries.unwrap_or(3) {
                r @ 0..=10 => Ok(r as u32),
                r => Err(format!("{r} retries are not in 0..10")),
            },
        );
        let http = super::http::validate(&mut e, &p, s.http.as_ref(), &ports);
        if let (
            Some(name),
            Some(namespace),
            Some(vip),
            Some(mode),
            Some(health_check),
            Some(connect_timeout),
            Some(retries),
            Some(retry_budget),
            Some(mtls),
            Some(http),
        ) = (name, namespace, vip, mode, health_check, connect_timeout, retries, retry_budget, mtls, http)
        {
            state.services.push(Service {
                name,
                namespace,
                vip,
                mode,
                ports,
                endpoints,
                health_check,
                fail_open: s.fail_open,
                connect_timeout,
                retries,
                retry_budget,
                mtls,
                authorization,
                http,
            });
        }
    }

    // connect4 rewrites every connect to a VIP: one that is also a pod's or
    // a node's address would capture ordinary traffic to it.
    for (i, vip) in vips {
        let holder = if let Some(n) = node_addrs.get(&vip) {
            format!("node {} (nodes[{n}])", doc.nodes[*n].name)
        } else if let Some(w) = workload_ips.get(&vip) {
            let w = &doc.workloads[*w];
            format!("workload {}/{} (workloads[{}])", w.namespace, w.name, workload_ips[&vip])
        } else if let Some((si, ei)) = endpoint_ips.get(&vip) {
            format!("an endpoint of {} (services[{si}].endpoints[{ei}])", doc.services[*si].name)
        } else {
            continue;
        };
        e.push(
            format!("services[{i}].vip"),
            format!("{vip} is the address of {holder}: a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP"),
        );
    }

    if e.0.is_empty() {
        Ok(state)
    } else {
        Err(ValidationErrors(e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;

    const GOOD: &str = r#"
nodes:
  - { name: node-a, address: 172.18.0.2 }
  - { name: node-b, address: 172.18.0.3 }
workloads:
  - { name: client, namespace: default, serviceAccount: client, node: node-a, ip: 10.244.1.2, netns: /var/run/netns/c }
  - { name: other, node: node-b, ip: 10.244.2.2, pid: 42 }
services:
  - name: web
    vip: 10.96.0.10
    ports: [ { port: 80, targetPort: 8080 }, { port: 443 } ]
    endpoints:
      - { ip: 10.244.1.3, node: node-a, weight: 3 }
      - { ip: 10.244.2.4, node: node-b }
"#;

    fn good() -> Document {
        parse_document(GOOD).unwrap()
    }

    /// Applies `edit` to the good document and returns the error messages.
    fn errors(edit: impl FnOnce(&mut Document)) -> Vec<String> {
        let mut d = good();
        edit(&mut d);
        match State::from_document(&d) {
            Ok(_) => panic!("document should be rejected"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn assert_error(edit: impl FnOnce(&mut Document), expected: &str) {
        let errs = errors(edit);
        assert!(errs.iter().any(|e| e == expected), "expected {expected:?} in {errs:#?}");
    }

    #[test]
    fn good_document_is_accepted_with_defaults() {
        let s = State::from_document(&good()).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.workloads[1].namespace.as_str(), "default");
        assert_eq!(s.workloads[1].netns, NetnsRef::Pid(42));
        let web = &s.services[0];
        assert_eq!(web.mode, Mode::Proxy);
        assert_eq!(web.ports[0].target_port, Port(8080));
        assert_eq!(web.ports[1].target_port, Port(443), "targetPort defaults to port");
        assert_eq!(web.endpoints[1].weight, Weight(1), "weight defaults to 1");
    }

    #[test]
    fn node_rules() {
        assert_error(|d| d.nodes[0].address = "x".into(), r#"nodes[0].address: "x" is not an IPv4 address"#);
        assert_error(|d| d.nodes[1].name = "node-a".into(), r#"nodes[1].name: node "node-a" is listed twice"#);
        let e = errors(|d| d.nodes[0].name = "Node_A".into());
        assert!(e[0].starts_with("nodes[0].name: \"Node_A\" is not a valid node name"), "{e:?}");
    }

    #[test]
    fn workload_rules() {
        assert_error(
            |d| d.workloads[0].ip = "10.0.0.300".into(),
            r#"workloads[0].ip: "10.0.0.300" is not an IPv4 address"#,
        );
        assert_error(
            |d| d.workloads[1].ip = "10.244.1.2".into(),
            "workloads[1].ip: 10.244.1.2 is already the address of workloads[0]",
        );
        assert_error(
            |d| d.workloads[0].node = "node-z".into(),
            r#"workloads[0].node: node "node-z" is not in `nodes`; add it there or fix the name"#,
        );
        assert_error(
            |d| d.workloads[0].netns = Some("relative".into()),
            r#"workloads[0].netns: "relative" is not an absolute path"#,
        );
        assert_error(|d| d.workloads[1].pid = Some(0), "workloads[1].pid: 0 is not a process id");
        assert_error(
            |d| d.workloads[1].pid = None,
            "workloads[1]: give `netns` (a path) or `pid` to find the pod's network namespace",
        );
        assert_error(|d| d.workloads[0].pid = Some(7), "workloads[0]: give either `netns` or `pid`, not both");
        assert!(errors(|d| d.workloads[0].name = "-x".into())[0].starts_with("workloads[0].name: "));
        assert!(errors(|d| d.workloads[0].namespace = "A".into())[0].starts_with("workloads[0].namespace: "));
        assert!(errors(|d| d.workloads[0].service_account = "".into())[0].starts_with("workloads[0].serviceAccount: "));
    }

    #[test]
    fn app_protocol_rules() {
        assert_error(
            |d| d.services[0].ports[0].app_protocol = Some("quic".into()),
            r#"services[0].ports[0].appProtocol: "quic" is not an application protocol: use "tcp", "http", "http2", "grpc" or "auto""#,
        );
        assert_error(
            |d| {
                d.services[0].mode = "kernel".into();
                d.services[0].ports[1].app_protocol = Some("grpc".into());
            },
            r#"services[0].ports[1].appProtocol: "grpc" needs services[0].mode: proxy, not kernel: the kernel balances connections and cannot see requests"#,
        );
        let mut d = good();
        d.services[0].mode = "kernel".into();
        d.services[0].ports[0].app_protocol = Some("tcp".into());
        assert!(State::from_document(&d).is_ok(), "kernel mode with tcp is fine");
        d.services[0].mode = "proxy".into();
        for (name, want) in [
            ("http", AppProtocol::Http),
            ("http2", AppProtocol::Http2),
            ("grpc", AppProtocol::Grpc),
            ("auto", AppProtocol::Auto),
        ] {
            d.services[0].ports[0].app_protocol = Some(name.into());
            assert_eq!(State::from_document(&d).unwrap().services[0].ports[0].app_protocol, want);
        }
        assert_eq!(
            State::from_document(&good()).unwrap().services[0].ports[0].app_protocol,
            AppProtocol::Tcp,
            "default"
        );
    }

    #[test]
    fn service_rules() {
        assert_error(|d| d.services[0].vip = "10.96.0".into(), r#"services[0].vip: "10.96.0" is not an IPv4 address"#);
        assert_error(
            |d| d.services[0].mode = "fast".into(),
            r#"services[0].mode: "fast" is not a mode: use "proxy" or "kernel""#,
        );
        assert_error(|d| d.services[0].ports.clear(), "services[0].ports: a service needs at least one port");
        assert_error(
            |d| d.services[0].ports[0].port = 70000,
            "services[0].ports[0].port: 70000 is not a port: use 1 to 65535",
        );
        assert_error(
            |d| d.services[0].ports[0].target_port = Some(0),
            "services[0].ports[0].targetPort: 0 is not a port: use 1 to 65535",
        );
        assert_error(|d| d.services[0].ports[1].port = 80, "services[0].ports[1].port: port 80 is listed twice");
        assert_error(
            |d| d.services[0].ports[0].protocol = "UDP".into(),
            r#"services[0].ports[0].protocol: "UDP" is not supported: use "TCP""#,
        );
        assert!(errors(|d| d.services[0].name = "Web".into())[0].starts_with("services[0].name: "));
        assert!(errors(|d| d.services[0].namespace = "".into())[0].starts_with("services[0].namespace: "));
        let dup = |d: &mut Document| {
            let mut s = d.services[0].clone();
            s.vip = "10.96.0.11".into();
            d.services.push(s);
        };
        assert_error(dup, "services[1].name: service default/web is already services[0]");
        let same_address = |d: &mut Document| {
            let mut s = d.services[0].clone();
            s.name = "web2".into();
            d.services.push(s);
        };
        assert_error(same_address, "services[1].ports[0].port: 10.96.0.10:80 is already served by services[0]");
    }

    #[test]
    fn endpoint_rules() {
        assert_error(
            |d| d.services[0].endpoints[0].ip = "10.0.0.300".into(),
            r#"services[0].endpoints[0].ip: "10.0.0.300" is not an IPv4 address"#,
        );
        assert_error(
            |d| d.services[0].endpoints[1].ip = "10.244.1.3".into(),
            "services[0].endpoints[1].ip: endpoint 10.244.1.3 is listed twice",
        );
        assert_error(
            |d| d.services[0].endpoints[0].node = "nowhere".into(),
            r#"services[0].endpoints[0].node: node "nowhere" is not in `nodes`; add it there or fix the name"#,
        );
        assert_error(
            |d| d.services[0].endpoints[0].weight = 70000,
            "services[0].endpoints[0].weight: weight 70000 is above the maximum 65535",
        );
        assert_error(
            |d| d.services[0].endpoints[0].weight = -1,
            "services[0].endpoints[0].weight: weight -1 is negative: use 0 (drain) to 65535",
        );
    }

    #[test]
    fn failover_and_health_rules() {
        assert_error(
            |d| d.services[0].endpoints[0].priority = 300,
            "services[0].endpoints[0].priority: priority 300 is not in 0..255 (0 is the most preferred)",
        );
        let hc = |f: fn(&mut HealthCheckDoc)| {
            move |d: &mut Document| {
                let mut h = HealthCheckDoc {
                    protocol: "http".into(),
                    path: Some("/healthz".into()),
                    interval: None,
                    timeout: None,
                    rise: None,
                    fall: None,
                };
                f(&mut h);
                d.services[0].health_check = Some(h);
            }
        };
        assert_error(
            hc(|h| h.protocol = "udp".into()),
            r#"services[0].healthCheck.protocol: "udp" is not a check: use "tcp", "http" or "none""#,
        );
        assert_error(
            hc(|h| h.path = Some("healthz".into())),
            r#"services[0].healthCheck.path: "healthz" must start with '/'"#,
        );
        assert_error(
            hc(|h| h.protocol = "tcp".into()),
            "services[0].healthCheck.path: a tcp check has no path; use protocol: http",
        );
        assert_error(
            hc(|h| h.interval = Some("5".into())),
            r#"services[0].healthCheck.interval: "5" is not a duration: write e.g. 500ms, 5s or 1m"#,
        );
        assert_error(
            hc(|h| h.interval = Some("10ms".into())),
            "services[0].healthCheck.interval: 10ms is not between 100ms and 3600s",
        );
        assert_error(
            hc(|h| h.timeout = Some("6s".into())),
            "services[0].healthCheck.timeout: 6s is longer than the interval 5s",
        );
        assert_error(hc(|h| h.rise = Some(0)), "services[0].healthCheck.rise: 0 is not in 1..100");
        assert_error(hc(|h| h.fall = Some(101)), "services[0].healthCheck.fall: 101 is not in 1..100");
        assert_error(|d| d.services[0].retries = Some(11), "services[0].retries: 11 retries are not in 0..10");
        assert_error(
            |d| d.services[0].connect_timeout = Some("5ms".into()),
            "services[0].connectTimeout: 5ms is not between 10ms and 60s",
        );
        assert_error(
            |d| d.services[0].retry_budget = Some("x".into()),
            r#"services[0].retryBudget: "x" is not a duration: write e.g. 500ms, 5s or 1m"#,
        );
        let s = State::from_document(&good()).unwrap();
        let web = &s.services[0];
        assert_eq!(
            web.health_check,
            Some(HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3
            }),
            "tcp check with the documented defaults"
        );
        assert!(web.fail_open);
        assert_eq!((web.retries, web.connect_timeout), (3, Duration::from_secs(1)));
        let mut d = good();
        d.services[0].health_check = Some(HealthCheckDoc {
            protocol: "none".into(),
            path: None,
            interval: None,
            timeout: None,
            rise: None,
            fall: None,
        });
        assert_eq!(State::from_document(&d).unwrap().services[0].health_check, None);
    }

    #[test]
    fn mtls_and_authorization_rules() {
        assert_error(
            |d| d.services[0].mtls = Some("maybe".into()),
            r#"services[0].mtls: "maybe" is not an mTLS mode: use "required" or "disabled""#,
        );
        let auth = |ids: &[&str], ns: &[&str]| {
            let a = AuthorizationDoc {
                identities: ids.iter().map(|s| s.to_string()).collect(),
                namespaces: ns.iter().map(|s| s.to_string()).collect(),
            };
            move |d: &mut Document| d.services[0].authorization = Some(a)
        };
        assert_error(
            auth(&["spiffe://cluster.local/ns/a/sa/b", "web"], &[]),
            r#"services[0].authorization.identities[1]: "web" is not a SPIFFE ID: it must start with spiffe://"#,
        );
        assert!(errors(auth(&[], &["Bad_NS"]))[0].starts_with("services[0].authorization.namespaces[0]: "));
        let s = State::from_document(&good()).unwrap();
        assert!(s.services[0].mtls, "mTLS is required by default");
        assert_eq!(s.services[0].authorization, None);
    }

    #[test]
    fn policy_decisions() {
        use crate::identity::Identity;
        let id = |s: &str| Identity::parse(s).unwrap();
        let td = "cluster.local";
        let (web, other_ns, foreign) = (
            id("spiffe://cluster.local/ns/default/sa/web"),
            id("spiffe://cluster.local/ns/shop/sa/cart"),
            id("spiffe://evil.example/ns/default/sa/web"),
        );
        assert!(Authorization::allows(None, td, &web), "default: same trust domain");
        assert!(!Authorization::allows(None, td, &foreign), "default: other trust domains are denied");
        let by_id = Authorization { identities: vec![web.clone()], namespaces: vec![] };
        assert!(Authorization::allows(Some(&by_id), td, &web));
        assert!(!Authorization::allows(Some(&by_id), td, &other_ns));
        let by_ns = Authorization { identities: vec![], namespaces: vec![Name::parse("shop").unwrap()] };
        assert!(Authorization::allows(Some(&by_ns), td, &other_ns));
        assert!(!Authorization::allows(Some(&by_ns), td, &web));
        let foreign_shop = id("spiffe://evil.example/ns/shop/sa/cart");
        assert!(!Authorization::allows(Some(&by_ns), td, &foreign_shop), "namespaces only count in our trust domain");
        let empty = Authorization { identities: vec![], namespaces: vec![] };
        assert!(!Authorization::allows(Some(&empty), td, &web), "an empty allow list denies all");
    }

    #[test]
    fn a_vip_may_not_shadow_a_node_a_workload_or_an_endpoint() {
        assert_error(
            |d| d.services[0].vip = "172.18.0.3".into(),
            "services[0].vip: 172.18.0.3 is the address of node node-b (nodes[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
        assert_error(
            |d| d.services[0].vip = "10.244.2.2".into(),
            "services[0].vip: 10.244.2.2 is the address of workload default/other (workloads[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
        // Another service's endpoint: the rule looks across services.
        let shadow = |d: &mut Document| {
            let mut s = d.services[0].clone();
            s.name = "api".into();
            s.vip = "10.96.0.20".into();
            s.endpoints.truncate(1);
            s.endpoints[0].ip = "10.244.9.9".into();
            d.services.push(s);
            d.services[0].vip = "10.244.9.9".into();
        };
        assert_error(
            shadow,
            "services[0].vip: 10.244.9.9 is the address of an endpoint of api (services[1].endpoints[0]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
    }

    #[test]
    fn more_workloads_than_one_node_holds_are_left_to_the_capacity_check() {
        // Cluster-wide counts are not limits: each node holds only its own
        // workloads in its map (see capacity.rs).
        let mut d = good();
        let w = d.workloads[1].clone();
        d.workloads = (0..5000u32)
            .map(|i| WorkloadDoc { ip: Ipv4Addr::from(0x0a01_0000 + i).to_string(), ..w.clone() })
            .collect();
        assert!(State::from_document(&d).is_ok());
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let e = errors(|d| {
            d.nodes[0].address = "bad".into();
            d.services[0].endpoints[0].weight = 70000;
            d.services[0].vip = "nope".into();
        });
        assert_eq!(e.len(), 3, "{e:#?}");
    }
}

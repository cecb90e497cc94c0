//! The writes of the API, one method per kind of request: each edits a
//! copy of the document, and the control plane applies it whole or not at all.

use super::*;

/// A write's context: where it goes, the generation it expects, how long
/// its body may take.
pub(super) struct Write<'a> {
    pub(super) control: &'a Arc<Control>,
    pub(super) if_match: Option<u64>,
    pub(super) body_timeout: Duration,
}

impl Write<'_> {
    /// `PUT /v1/state`: the whole document.
    pub(super) async fn state(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let new: Document = match body_bytes(req, self.body_timeout).await.and_then(|b| parse_body(&b)) {
            Ok(d) => d,
            Err(r) => return *r,
        };
        write(self.control, self.if_match, move |d| {
            *d = new;
            Ok(())
        })
        .await
    }

    /// `PUT /v1/state?dryRun=true`: what the document would change,
    /// checked as a write is; nothing is applied.
    pub(super) async fn state_dry_run(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let new: Document = match body_bytes(req, self.body_timeout).await.and_then(|b| parse_body(&b)) {
            Ok(d) => d,
            Err(r) => return *r,
        };
        let (c, if_match) = (self.control.clone(), self.if_match);
        match tokio::task::spawn_blocking(move || {
            c.dry_run(if_match, move |d| {
                *d = new;
                Ok(())
            })
        })
        .await
        {
            Ok(Ok((generation, changes))) => {
                respond(StatusCode::OK, &json!({ "dryRun": true, "generation": generation, "changes": changes }))
            }
            Ok(Err(e)) => write_error(e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("dry run failed: {e}")),
        }
    }

    /// The body of a `PUT` of one item, its `name` (and `namespace`) set
    /// from the URL or checked against it.
    pub(super) async fn item<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<Incoming>,
        ns: Option<&str>,
        name: &str,
    ) -> Result<T, Box<Reply>> {
        let mut v = body_value(req, self.body_timeout).await?;
        url_field(&mut v, "name", name)?;
        if let Some(ns) = ns {
            url_field(&mut v, "namespace", ns)?;
        }
        parse(v)
    }

    pub(super) async fn node(&self, req: Request<Incoming>, name: &str) -> Response<Full<Bytes>> {
        match self.item::<NodeDoc>(req, None, name).await {
            Ok(n) => {
                put_item(self.control, self.if_match, "nodes", n, |d, n| {
                    let name = n.name.clone();
                    upsert(&mut d.nodes, n, |x| x.name == name)
                })
                .await
            }
            Err(r) => *r,
        }
    }

    pub(super) async fn workload(&self, req: Request<Incoming>, ns: &str, name: &str) -> Response<Full<Bytes>> {
        match self.item::<WorkloadDoc>(req, Some(ns), name).await {
            Ok(w) => {
                put_item(self.control, self.if_match, "workloads", w, |d, w| {
                    let key = (w.namespace.clone(), w.name.clone());
                    upsert(&mut d.workloads, w, |x| (x.namespace.clone(), x.name.clone()) == key)
                })
                .await
            }
            Err(r) => *r,
        }
    }

    pub(super) async fn service(&self, req: Request<Incoming>, ns: &str, name: &str) -> Response<Full<Bytes>> {
        match self.item::<ServiceDoc>(req, Some(ns), name).await {
            Ok(s) => {
                put_item(self.control, self.if_match, "services", s, |d, s| {
                    match d.find_service(&s.namespace, &s.name) {
                        Some(i) => {
                            d.services[i] = std::sync::Arc::new(s);
                            i
                        }
                        None => {
                            d.services.push(std::sync::Arc::new(s));
                            d.services.len() - 1
                        }
                    }
                })
                .await
            }
            Err(r) => *r,
        }
    }

    pub(super) async fn delete_node(&self, name: &str) -> Response<Full<Bytes>> {
        let name = name.to_string();
        write(self.control, self.if_match, move |d| {
            let before = d.nodes.len();
            d.nodes.retain(|n| n.name != name);
            if d.nodes.len() == before {
                return Err(WriteError::NotFound(format!("node {name} not found")));
            }
            Ok(())
        })
        .await
    }

    /// `DELETE /v1/{workloads|services}/NS/NAME`.
    pub(super) async fn delete(&self, kind: &str, ns: &str, name: &str) -> Response<Full<Bytes>> {
        let (kind, ns, name) = (kind.to_string(), ns.to_string(), name.to_string());
        write(self.control, self.if_match, move |d| {
            let gone = if kind == "workloads" {
                let before = d.workloads.len();
                d.workloads.retain(|w| !(w.namespace == ns && w.name == name));
                before != d.workloads.len()
            } else {
                let before = d.services.len();
                d.services.retain(|s| !(s.namespace == ns && s.name == name));
                before != d.services.len()
            };
            if !gone {
                return Err(WriteError::NotFound(format!("{} {ns}/{name} not found", kind.trim_end_matches('s'))));
            }
            Ok(())
        })
        .await
    }

    /// `PATCH /v1/services/NS/NAME/endpoints/IP` with `{"weight": N}`.
    pub(super) async fn weight(&self, req: Request<Incoming>, ns: &str, name: &str, ip: &str) -> Response<Full<Bytes>> {
        let (ns, name, ip) = (ns.to_string(), name.to_string(), ip.to_string());
        let v = match body_value(req, self.body_timeout).await {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let Some(weight) = v.get("weight").and_then(Value::as_i64) else {
            return error(StatusCode::BAD_REQUEST, "the body must be {\"weight\": N} with N from 0 to 65535");
        };
        write(self.control, self.if_match, move |d| {
            let i = d
                .find_service(&ns, &name)
                .ok_or_else(|| WriteError::NotFound(format!("service {ns}/{name} not found")))?;
            let s = d.service_mut(i);
            let e: &mut EndpointDoc = s
                .endpoints
                .iter_mut()
                .find(|e| same_ip(&e.ip, &ip))
                .ok_or_else(|| WriteError::NotFound(format!("endpoint {ip} of service {ns}/{name} not found")))?;
            e.weight = weight;
            Ok(())
        })
        .await
    }
}

/// Whether two written addresses are the same: as written, or as parsed
/// (an IPv6 address has many spellings: `fd00::5`, `fd00:0::5`).
fn same_ip(a: &str, b: &str) -> bool {
    a == b || a.parse::<std::net::IpAddr>().is_ok_and(|x| b.parse() == Ok(x))
}

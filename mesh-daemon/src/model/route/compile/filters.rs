//! A route rule's and a backendRef's filters: header modifiers, redirects,
//! rewrites and mirrors, checked and compiled.

use super::*;

/// The filters of a rule (`on_rule`) or a backendRef; a GRPCRoute's
/// (`grpc`) have no redirect or rewrite, as the spec says.
pub(super) fn filters(
    e: &mut Errors,
    p: &str,
    docs: &[FilterDoc],
    (on_rule, grpc): (bool, bool),
    resolve: &Resolve<'_>,
) -> Filters {
    let mut f = Filters::default();
    for (i, d) in docs.iter().enumerate() {
        let fp = format!("{p}[{i}]");
        let given = [
            ("RequestHeaderModifier", d.request_header_modifier.is_some()),
            ("ResponseHeaderModifier", d.response_header_modifier.is_some()),
            ("RequestRedirect", d.request_redirect.is_some()),
            ("URLRewrite", d.url_rewrite.is_some()),
            ("RequestMirror", d.request_mirror.is_some()),
            ("ExtensionRef", d.extension_ref.is_some()),
        ];
        if given.iter().filter(|(_, g)| *g).count() != 1 || !given.iter().any(|(k, g)| *g && *k == d.kind) {
            e.push(fp.clone(), format!("type {:?} must come with its one field (e.g. type: RequestHeaderModifier with requestHeaderModifier)", d.kind));
            continue;
        }
        let twice = |e: &mut Errors| e.push(fp.clone(), format!("a second {} filter: merge it into the first", d.kind));
        match d.kind.as_str() {
            "RequestHeaderModifier" => match &f.request_headers {
                Some(_) => twice(e),
                None => f.request_headers = header_modifier(e, &format!("{fp}.requestHeaderModifier"), d.request_header_modifier.as_ref()),
            },
            "ResponseHeaderModifier" => match &f.response_headers {
                Some(_) => twice(e),
                None => f.response_headers = header_modifier(e, &format!("{fp}.responseHeaderModifier"), d.response_header_modifier.as_ref()),
            },
            "RequestRedirect" | "URLRewrite" if grpc => {
                e.push(fp, format!("{} is for HTTPRoute: a GRPCRoute has header modifiers and mirrors", d.kind))
            }
            "RequestRedirect" if on_rule => {
                let r = d.request_redirect.clone().unwrap_or_default();
                let rp = format!("{fp}.requestRedirect");
                let status = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    e.push(format!("{rp}.statusCode"), format!("{status} is not a redirect: use 301, 302, 303, 307 or 308"));
                }
                if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                    e.push(format!("{rp}.scheme"), "use \"http\" or \"https\"");
                }
                let port = r.port.and_then(|n| e.take(|| format!("{rp}.port"), crate::model::Port::parse(i64::from(n))).map(|p| p.0));
                let path = r.path.as_ref().and_then(|m| path_modifier(e, &format!("{rp}.path"), m));
                f.redirect = Some(Redirect { scheme: r.scheme, hostname: r.hostname, path, port, status });
            }
            "URLRewrite" if on_rule => {
                let r = d.url_rewrite.clone().unwrap_or_default();
                let rp = format!("{fp}.urlRewrite");
                let hostname = r.hostname.as_deref().and_then(|h| {
                    e.take(|| format!("{rp}.hostname"), HeaderValue::from_str(h).map_err(|_| invalid!("{h:?} is not a host name")))
                });
                let path = r.path.as_ref().and_then(|m| path_modifier(e, &format!("{rp}.path"), m));
                f.rewrite = Some(Rewrite { hostname, path });
            }
            "RequestRedirect" | "URLRewrite" => e.push(fp, format!("{} belongs on the rule, not on a backendRef", d.kind)),
            "RequestMirror" => {
                let m = d.request_mirror.clone().unwrap_or_default();
                let mp = format!("{fp}.requestMirror");
                let share = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        e.push(mp.clone(), "percent and fraction together: keep one");
                        None
                    }
                    (Some(pc), None) if pc <= 100 => Some((pc, 100)),
                    (Some(pc), None) => {
                        e.push(format!("{mp}.percent"), format!("{pc} is over 100"));
                        None
                    }
                    (None, Some(f)) => match f.denominator.unwrap_or(100) {
                        0 => {
                            e.push(format!("{mp}.fraction.denominator"), "is 0: use a positive denominator");
                            None
                        }
                        d if f.numerator > d => {
                            e.push(format!("{mp}.fraction"), format!("{}/{d} is over 1", f.numerator));
                            None
                        }
                        d => Some((f.numerator, d)),
                    },
                    (None, None) => Some((1, 1)),
                };
                let port = resolve(e, &format!("{mp}.backendRef"), &m.backend_ref);
                if let (Some((numerator, denominator)), Some(port)) = (share, port) {
                    f.mirrors.push(Mirror { port, numerator, denominator });
                }
            }
            k => e.push(format!("{fp}.type"), format!("{k} is not implemented: use RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite or RequestMirror")),
        }
    }
    if f.redirect.is_some() && f.rewrite.is_some() {
        e.push(p.to_owned(), "RequestRedirect and URLRewrite together: a redirected request is not sent on, keep one");
    }
    f
}

pub(super) fn header_modifier(e: &mut Errors, p: &str, d: Option<&HeaderModifierDoc>) -> Option<HeaderModifier> {
    let d = d?;
    let mut m = HeaderModifier::default();
    for (list, to) in [(&d.set, &mut m.set), (&d.add, &mut m.add)] {
        for (i, h) in list.iter().enumerate() {
            let hp = format!("{p}.{}[{i}]", if std::ptr::eq(list, &d.set) { "set" } else { "add" });
            let name = header_name(e, &format!("{hp}.name"), &h.name);
            let value = e.take(
                || format!("{hp}.value"),
                HeaderValue::from_str(&h.value).map_err(|_| invalid!("{:?} is not a header value", h.value)),
            );
            if let (Some(n), Some(v)) = (name, value) {
                to.push((n, v));
            }
        }
    }
    for (i, n) in d.remove.iter().enumerate() {
        if let Some(n) = header_name(e, &format!("{p}.remove[{i}]"), n) {
            m.remove.push(n);
        }
    }
    Some(m)
}

pub(super) fn path_modifier(e: &mut Errors, p: &str, d: &PathModifierDoc) -> Option<PathModifier> {
    let abs = |e: &mut Errors, f: &str, v: &Option<String>| -> Option<String> {
        match v {
            Some(s) if s.starts_with('/') => Some(s.clone()),
            Some(s) => {
                e.push(format!("{p}.{f}"), format!("{s:?} does not start with '/'"));
                None
            }
            None => {
                e.push(format!("{p}.{f}"), format!("is missing for type {}", d.kind));
                None
            }
        }
    };
    match d.kind.as_str() {
        "ReplaceFullPath" => abs(e, "replaceFullPath", &d.replace_full_path).map(PathModifier::Full),
        "ReplacePrefixMatch" => abs(e, "replacePrefixMatch", &d.replace_prefix_match).map(PathModifier::Prefix),
        k => {
            e.push(format!("{p}.type"), format!("{k:?}: use ReplaceFullPath or ReplacePrefixMatch"));
            None
        }
    }
}

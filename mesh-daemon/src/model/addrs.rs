//! Addresses of both families: which family an address is, the
//! one-per-family lists nodes, workloads and services carry (as
//! Kubernetes' `podIPs`, `clusterIPs` and a node's `InternalIP`s), and
//! which addresses a document may name at all.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::errors::{invalid, Invalid};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `IPv4` or `IPv6`, as messages and Kubernetes' `ipFamilies` write it.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// At most one address of each family; a validated one has at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Addresses {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl Addresses {
    pub fn one(ip: IpAddr) -> Self {
        let mut a = Addresses::default();
        a.set(ip);
        a
    }

    /// Puts `ip` in its family's place; the address it replaced, if any.
    pub fn set(&mut self, ip: IpAddr) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(v4) => self.v4.replace(v4).map(IpAddr::V4),
            IpAddr::V6(v6) => self.v6.replace(v6).map(IpAddr::V6),
        }
    }

    pub fn get(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.v4.map(IpAddr::V4),
            Family::V6 => self.v6.map(IpAddr::V6),
        }
    }

    pub fn v4(&self) -> Option<Ipv4Addr> {
        self.v4
    }

    pub fn v6(&self) -> Option<Ipv6Addr> {
        self.v6
    }

    /// IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4.map(IpAddr::V4).into_iter().chain(self.v6.map(IpAddr::V6))
    }

    pub fn families(&self) -> impl Iterator<Item = Family> + '_ {
        self.iter().map(Family::of)
    }

    pub fn len(&self) -> usize {
        usize::from(self.v4.is_some()) + usize::from(self.v6.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.get(Family::of(ip)) == Some(ip)
    }

    /// The IPv4 address if there is one, else the IPv6 one (`::` for
    /// none): the address to name the holder by.
    pub fn primary(&self) -> IpAddr {
        self.iter().next().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    }
}

impl fmt::Display for Addresses {
    /// `10.96.0.10`, or both: `10.96.0.10, fd00:96::10`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ip) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{ip}")?;
        }
        Ok(())
    }
}

/// An address a document may name for a node, a pod, a VIP or an
/// endpoint: either family, written plainly. Refused: what no connection
/// is meshed through (unspecified, multicast, broadcast), link-local
/// addresses (valid on one link only: the same one names different hosts
/// on different nodes), and an IPv4 address written as IPv4-mapped IPv6
/// (it is the IPv4 address; write it so).
pub fn parse_ip(s: &str) -> Result<IpAddr, Invalid> {
    let ip: IpAddr = s.parse().map_err(|_| invalid!("{s:?} is not an IP address (IPv4 or IPv6)"))?;
    let why = match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_link_local() => Some("a link-local address (169.254.0.0/16)"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("a link-local address (fe80::/10)"),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return Err(invalid!("{s:?} is an IPv4-mapped IPv6 address: write the IPv4 address, {v4}"));
            }
            None
        }
        IpAddr::V4(_) => None,
    };
    match why {
        Some(what) => Err(invalid!("{s} is {what}: give a unicast address that routes beyond one link")),
        None => Ok(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_holds_one_address_per_family() {
        let mut a = Addresses::one("10.96.0.10".parse().unwrap());
        assert_eq!(a.set("fd00:96::10".parse().unwrap()), None);
        assert_eq!(a.to_string(), "10.96.0.10, fd00:96::10");
        assert_eq!(a.set("10.96.0.11".parse().unwrap()), Some("10.96.0.10".parse().unwrap()));
        assert!(a.contains("10.96.0.11".parse().unwrap()));
        assert!(!a.contains("10.96.0.10".parse().unwrap()));
        assert_eq!(a.families().collect::<Vec<_>>(), [Family::V4, Family::V6]);
        let v6 = Addresses::one("fd00::1".parse().unwrap());
        assert_eq!(v6.primary(), "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.get(Family::V4), None);
    }

    #[test]
    fn addresses_that_cannot_be_meshed_are_refused_with_the_reason() {
        for ok in ["10.0.0.1", "172.18.0.2", "fd00::5", "2001:db8::1", "127.0.0.1"] {
            assert!(parse_ip(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("10.0.0", "not an IP address"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "write the IPv4 address, 10.0.0.1"),
        ] {
            let e = parse_ip(bad).unwrap_err().0;
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}

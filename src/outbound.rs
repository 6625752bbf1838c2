//! Every HTTP request Courier makes to another server (rest-hook notifications, clients' JWKS
//! documents, EHR discovery, token endpoints, FHIR write-back, style sheets) goes through an
//! [`Outbound`]: the one defence against server-side request forgery.
//!
//! - A host name is resolved by [`Outbound`]'s own resolver, which refuses the name if ANY of its
//!   addresses is not a public unicast address ([`forbidden`]); the connection then goes to exactly
//!   the addresses that were checked (hyper connects to what the resolver returned: no second
//!   lookup, so DNS rebinding cannot swap in another address).
//! - An address written in the URL is never given to a resolver, so [`Outbound::get`],
//!   [`Outbound::post`] and [`Outbound::execute`] check it before a request exists.
//! - Redirects are never followed (a token or assertion is never forwarded elsewhere either), and
//!   no proxy from the environment is used (a proxy would resolve the name itself).
//! - `COURIER_OUTBOUND_ALLOW` lists networks that may be reached all the same (an EHR or an
//!   integration engine on the hospital's network); `COURIER_SUBSCRIPTION_PRIVATE_ENDPOINTS=true`
//!   lifts the address rules altogether (closed networks, tests).

use ipnet::IpNet;
use parking_lot::RwLock;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Why a URL or an address may not be fetched. The text names the host and the rule, never more.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for String {
    fn from(r: Refused) -> String {
        r.0
    }
}

const ALLOW_HINT: &str = " (COURIER_OUTBOUND_ALLOW lists the networks it may reach)";

/// What may be reached, and the names a test (or an operator) pins to addresses.
struct Guard {
    /// No address rules at all (`COURIER_SUBSCRIPTION_PRIVATE_ENDPOINTS=true`).
    any_address: bool,
    /// Networks reachable even though their addresses are not public (`COURIER_OUTBOUND_ALLOW`).
    allow: Vec<IpNet>,
    /// Names answered from here instead of DNS: the resolver a test controls. Their addresses
    /// are checked like any others.
    pinned: RwLock<HashMap<String, Vec<IpAddr>>>,
}

impl Guard {
    /// Whether `ip` may be reached: `Err` names the rule that forbids it.
    fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        if self.any_address {
            return Ok(());
        }
        let Some(why) = forbidden(ip) else {
            return Ok(());
        };
        let plain = canonical(ip);
        if self
            .allow
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&plain))
        {
            return Ok(());
        }
        Err(why)
    }

    /// Resolves `name` (pinned names first, then the system resolver) and checks every address.
    async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, Refused> {
        let addrs = self
            .lookup(name)
            .await?
            .map_err(|e| Refused(format!("{name} could not be resolved: {e}")))?;
        self.check_all(name, &addrs)?;
        Ok(addrs)
    }

    /// The addresses of `name`: refused outright for loopback names, else the lookup's result.
    async fn lookup(&self, name: &str) -> Result<std::io::Result<Vec<IpAddr>>, Refused> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if key == "localhost" || key.ends_with(".localhost") {
            // Loopback by definition (RFC 6761 §6.3), never asked of DNS: its addresses that the
            // rules admit (COURIER_OUTBOUND_ALLOW covering 127.0.0.0/8, say), else refused.
            let admitted: Vec<IpAddr> = [
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ]
            .into_iter()
            .filter(|ip| self.check(*ip).is_ok())
            .collect();
            if admitted.is_empty() {
                return Err(Refused(format!(
                    "{name} is a loopback name; Courier does not connect to it{ALLOW_HINT}"
                )));
            }
            return Ok(Ok(admitted));
        }
        let pinned = self.pinned.read().get(&key).cloned();
        Ok(match pinned {
            Some(a) => Ok(a),
            None => tokio::net::lookup_host((key.as_str(), 0))
                .await
                .map(|a| a.map(|a| a.ip()).collect()),
        })
    }

    fn check_all(&self, name: &str, addrs: &[IpAddr]) -> Result<(), Refused> {
        if addrs.is_empty() {
            return Err(Refused(format!("{name} has no address")));
        }
        for ip in addrs {
            if let Err(why) = self.check(*ip) {
                // The caller is told only that the name is refused, not what it resolves to
                // (no map of the internal network); the operator sees which address and rule.
                tracing::warn!(host = %name, address = %ip, rule = why, "outbound call refused");
                return Err(Refused(format!(
                    "{name} resolves to an address that is not public; Courier does not connect to it{ALLOW_HINT}"
                )));
            }
        }
        Ok(())
    }

    fn check_address(&self, ip: IpAddr) -> Result<(), Refused> {
        self.check(ip).map_err(|why| {
            Refused(format!(
                "{ip} is {why}; Courier does not connect to it{ALLOW_HINT}"
            ))
        })
    }

    /// Checks the host of `url` when it is an address; names are left to the resolver.
    fn check_literal(&self, url: &reqwest::Url) -> Result<(), Refused> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(Refused(format!("the scheme {other} is not fetched"))),
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_address(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_address(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Refused("the URL has no host".into())),
        }
    }
}

/// The resolver reqwest uses for names: resolve, check every address, hand back exactly those.
struct CheckingResolver(Arc<Guard>);

impl Resolve for CheckingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let addrs = guard.resolve(&name).await?;
            let addrs: Addrs = Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The HTTP client for other servers. Cheap to clone; clones share the pinned names.
#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    guard: Arc<Guard>,
}

impl Outbound {
    /// The client for these settings; fails on a malformed `COURIER_OUTBOUND_ALLOW` entry.
    pub fn new(settings: &crate::config::Settings) -> anyhow::Result<Outbound> {
        let allow = settings
            .outbound_allow
            .iter()
            .map(|n| parse_net(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Outbound::build(
            settings.subscription_private_endpoints,
            allow,
        ))
    }

    /// Public addresses only (the default settings).
    pub fn public_only() -> Outbound {
        Outbound::build(false, vec![])
    }

    /// Any address at all: for tests and closed networks.
    pub fn any_address() -> Outbound {
        Outbound::build(true, vec![])
    }

    fn build(any_address: bool, allow: Vec<IpNet>) -> Outbound {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let guard = Arc::new(Guard {
            any_address,
            allow,
            pinned: RwLock::new(HashMap::new()),
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(CheckingResolver(guard.clone())))
            .build()
            .expect("HTTP client builds");
        Outbound { client, guard }
    }

    /// Answers `name` with `addrs` from now on instead of asking DNS (the addresses are still
    /// checked). Tests use it as the resolver they control.
    pub fn pin(&self, name: &str, addrs: &[IpAddr]) {
        self.guard.pinned.write().insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            addrs.to_vec(),
        );
    }

    /// A GET of `url`, if its host may be reached as far as can be told without DNS.
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, Refused> {
        self.request(reqwest::Method::GET, url)
    }

    /// A POST to `url`, as [`Outbound::get`].
    pub fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, Refused> {
        self.request(reqwest::Method::POST, url)
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, Refused> {
        let url = reqwest::Url::parse(url).map_err(|e| Refused(format!("not a URL: {e}")))?;
        self.guard.check_literal(&url)?;
        Ok(self.client.request(method, url))
    }

    /// Sends a request built elsewhere (the OAuth adapter), after the same check.
    pub async fn execute(&self, req: reqwest::Request) -> Result<reqwest::Response, SendError> {
        self.guard
            .check_literal(req.url())
            .map_err(SendError::Refused)?;
        self.client.execute(req).await.map_err(SendError::Http)
    }

    /// Resolves and checks `url`'s host now, so a caller can refuse a URL when it is given
    /// (a rest-hook endpoint at create) with a clear message. The request itself is checked again.
    /// A name that does not resolve (yet) passes: delivery will retry and report it.
    pub async fn check(&self, url: &str) -> Result<(), Refused> {
        let parsed = reqwest::Url::parse(url).map_err(|e| Refused(format!("not a URL: {e}")))?;
        self.guard.check_literal(&parsed)?;
        if let Some(url::Host::Domain(name)) = parsed.host() {
            let looked = tokio::time::timeout(Duration::from_secs(3), self.guard.lookup(name));
            if let Ok(found) = looked.await {
                if let Ok(addrs) = found? {
                    self.guard.check_all(name, &addrs)?;
                }
            }
        }
        Ok(())
    }
}

/// What went wrong with a request, for logs and `last_error`: the address rule that refused it
/// when one did, else reqwest's error without the URL.
pub fn why(e: reqwest::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return r.0.clone();
        }
        cause = c.source();
    }
    e.without_url().to_string()
}

/// A request that was refused before it was sent, or failed in flight.
#[derive(Debug)]
pub enum SendError {
    Refused(Refused),
    Http(reqwest::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Refused(r) => r.fmt(f),
            SendError::Http(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SendError {}

/// A CIDR (`10.20.0.0/16`, `fd00::/8`) or a single address.
fn parse_net(s: &str) -> anyhow::Result<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            anyhow::anyhow!("COURIER_OUTBOUND_ALLOW: '{s}' is not an address or a CIDR network")
        })
}

/// An IPv6 address that carries an IPv4 one (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`)
/// as that IPv4 address; anything else unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:0:0/96`) or IPv4-compatible (`::/96`) one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s[..6] {
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0, 0] => Some(low),
        _ => None,
    }
}

/// Why `ip` is not a public unicast address Courier may connect to, or `None` when it is.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "an unspecified or 'this network' address (0.0.0.0/8)",
        (10, ..) => "a private address (10.0.0.0/8)",
        (100, 64..=127, _) => "a shared (carrier-grade NAT) address (100.64.0.0/10)",
        (127, ..) => "a loopback address",
        (169, 254, _) => "a link-local address (169.254.0.0/16)",
        (172, 16..=31, _) => "a private address (172.16.0.0/12)",
        (192, 0, 0) => "an IETF protocol address (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "a documentation address",
        (192, 88, 99) => "a 6to4 relay address (192.88.99.0/24)",
        (192, 168, _) => "a private address (192.168.0.0/16)",
        (198, 18..=19, _) => "a benchmarking address (198.18.0.0/15)",
        (224..=239, ..) => "a multicast address",
        (240..=255, ..) => "a reserved or broadcast address (240.0.0.0/4)",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = embedded_v4(ip) {
        if ip.is_unspecified() {
            return Some("the unspecified address");
        }
        if ip.is_loopback() {
            return Some("a loopback address");
        }
        // Mapped and compatible addresses reach the IPv4 address they carry.
        return forbidden_v4(v4).map(|_| "an IPv6 form of a forbidden IPv4 address");
    }
    // Only global unicast (2000::/3) is public; that excludes NAT64 (64:ff9b::/96,
    // 64:ff9b:1::/48), discard-only 100::/64, unique-local fc00::/7, link-local fe80::/10,
    // site-local fec0::/10 and multicast ff00::/8.
    if s[0] & 0xe000 != 0x2000 {
        return Some(match s[0] {
            0x64 if s[1] == 0xff9b => "a NAT64 address (64:ff9b::/96, 64:ff9b:1::/48)",
            0xfc00..=0xfdff => "a unique-local address (fc00::/7)",
            0xfe80..=0xfebf => "a link-local address (fe80::/10)",
            0xfec0..=0xfeff => "a site-local address (fec0::/10)",
            0xff00..=0xffff => "a multicast address",
            _ => "not a global unicast address (2000::/3)",
        });
    }
    match s[0] {
        // IETF protocol assignments: Teredo 2001::/32, benchmarking 2001:2::/48, ORCHID, ...
        0x2001 if s[1] < 0x0200 => Some("an IETF special-purpose address (2001::/23, Teredo)"),
        0x2001 if s[1] == 0x0db8 => Some("a documentation address (2001:db8::/32)"),
        // 6to4 carries an IPv4 address in its second and third groups.
        0x2002 => {
            let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
            forbidden_v4(v4).map(|_| "a 6to4 address of a forbidden IPv4 address")
        }
        0x3fff if s[1] < 0x1000 => Some("a documentation address (3fff::/20)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no(s: &str) {
        let ip: IpAddr = s.parse().unwrap();
        assert!(forbidden(ip).is_some(), "{s} must be refused");
    }

    fn yes(s: &str) {
        let ip: IpAddr = s.parse().unwrap();
        assert_eq!(forbidden(ip), None, "{s} must be allowed");
    }

    #[test]
    fn every_non_public_ipv4_range_is_refused() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.0.0.2",
            "127.255.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            no(s);
        }
    }

    #[test]
    fn public_ipv4_addresses_pass() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.17.0.1",
            "198.20.0.1",
            "223.255.255.1",
        ] {
            yes(s);
        }
    }

    #[test]
    fn ipv6_forms_of_forbidden_addresses_are_refused() {
        for s in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:2",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:100.64.0.1",
            "::127.0.0.1",
            "::10.1.2.3",
            "::169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::808:808",
            "64:ff9b:1::1",
            "100::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "feff::1",
            "ff02::1",
            "ff05::1:3",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:0a00:0001::",
            "3fff::1",
            "1::1",
            "4000::1",
        ] {
            no(s);
        }
    }

    #[test]
    fn public_ipv6_addresses_pass() {
        for s in [
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2002:808:808::1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
            "2001:200::1",
        ] {
            yes(s);
        }
    }

    #[test]
    fn allowed_networks_open_only_themselves_and_any_address_opens_all() {
        let g = Guard {
            any_address: false,
            allow: vec![
                parse_net("10.20.0.0/16").unwrap(),
                parse_net("fd00::5").unwrap(),
            ],
            pinned: RwLock::new(HashMap::new()),
        };
        assert!(g.check("10.20.3.4".parse().unwrap()).is_ok());
        assert!(g.check("::ffff:10.20.3.4".parse().unwrap()).is_ok());
        assert!(g.check("fd00::5".parse().unwrap()).is_ok());
        assert!(g.check("10.21.0.1".parse().unwrap()).is_err());
        assert!(g.check("fd00::6".parse().unwrap()).is_err());
        assert!(g.check("127.0.0.1".parse().unwrap()).is_err());
        assert!(parse_net("10.0.0.0/33").is_err() && parse_net("intranet").is_err());
        let all = Guard {
            any_address: true,
            allow: vec![],
            pinned: RwLock::new(HashMap::new()),
        };
        assert!(all.check("127.0.0.1".parse().unwrap()).is_ok());
    }

    /// `localhost` is loopback, never looked up: refused unless the rules admit loopback, then
    /// the admitted loopback addresses only.
    #[tokio::test]
    async fn localhost_is_loopback_and_reachable_only_when_loopback_is_allowed() {
        let g = Guard {
            any_address: false,
            allow: vec![parse_net("127.0.0.0/8").unwrap()],
            pinned: RwLock::new(HashMap::new()),
        };
        assert_eq!(
            g.resolve("LocalHost.").await.unwrap(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(g.resolve("ehr.localhost").await.unwrap().len(), 1);
        let none = Guard {
            any_address: false,
            allow: vec![parse_net("10.0.0.0/8").unwrap()],
            pinned: RwLock::new(HashMap::new()),
        };
        assert!(none.resolve("localhost").await.is_err());
    }

    #[tokio::test]
    async fn names_are_refused_when_any_address_is_forbidden() {
        let o = Outbound::public_only();
        o.pin(
            "mixed.test",
            &[
                "93.184.216.34".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
            ],
        );
        o.pin("public.test", &["93.184.216.34".parse().unwrap()]);
        assert!(o.guard.resolve("MIXED.test.").await.is_err());
        assert!(o.guard.resolve("public.test").await.is_ok());
        assert!(o.guard.resolve("localhost").await.is_err());
        assert!(o.guard.resolve("a.localhost").await.is_err());
        assert!(o.get("https://[::ffff:127.0.0.1]:18443/").is_err());
        assert!(
            o.get("http://2130706433/").is_err(),
            "decimal IPv4 is parsed as 127.0.0.1"
        );
        assert!(o.get("http://0x7f.1/").is_err());
        assert!(o.get("file:///etc/passwd").is_err());
        assert!(o.get("https://public.test/").is_ok());
    }
}

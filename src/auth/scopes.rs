//! SMART scopes: v2 `patient|user|system / Type|* . cruds [?query]`, v1 `.read` / `.write` / `.*`
//! mapped to v2, and the non-resource scopes (`openid`, `fhirUser`, `launch`, …) that grant no data.

use std::fmt;

/// Whose data a scope is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Context {
    Patient,
    User,
    System,
}

impl Context {
    fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// One of the five SMART v2 permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Perm {
    fn bit(self) -> u8 {
        match self {
            Perm::Create => 1,
            Perm::Read => 2,
            Perm::Update => 4,
            Perm::Delete => 8,
            Perm::Search => 16,
        }
    }
    pub fn letter(self) -> char {
        ORDER[self.bit().trailing_zeros() as usize]
    }
}

const ORDER: [char; 5] = ['c', 'r', 'u', 'd', 's'];

/// A resource scope. `resource` is a type name or `*`; `query` restricts it to resources matching
/// a search (`patient/Communication.rs?category=alert`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub context: Context,
    pub resource: String,
    perms: u8,
    pub query: Option<String>,
}

impl Scope {
    pub fn allows(&self, perm: Perm) -> bool {
        self.perms & perm.bit() != 0
    }

    /// Does this scope name `res_type`? `*` names every type except AuditEvent: reading the audit
    /// trail takes a scope that names it.
    pub fn names(&self, res_type: &str) -> bool {
        self.resource == res_type || (self.resource == "*" && res_type != "AuditEvent")
    }

    /// `requested ∩ registered`: the part of `self` that `other` also grants, if any.
    pub fn intersect(&self, other: &Scope) -> Option<Scope> {
        if self.context != other.context {
            return None;
        }
        let resource = match (self.resource.as_str(), other.resource.as_str()) {
            // `*` never names AuditEvent, here as everywhere.
            ("*", "AuditEvent") | ("AuditEvent", "*") => return None,
            ("*", r) | (r, "*") => r.to_string(),
            (a, b) if a == b => a.to_string(),
            _ => return None,
        };
        let perms = self.perms & other.perms;
        if perms == 0 {
            return None;
        }
        let query = match (&self.query, &other.query) {
            (None, q) | (q, None) => q.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        Some(Scope {
            context: self.context,
            resource,
            perms,
            query,
        })
    }
}

/// Rendered in v2 syntax (a v1 scope comes out as its v2 equivalent).
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let perms: String = ORDER
            .iter()
            .enumerate()
            .filter(|(i, _)| self.perms & (1 << i) != 0)
            .map(|(_, c)| *c)
            .collect();
        write!(f, "{}/{}.{perms}", self.context.as_str(), self.resource)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// Scopes that are not about resources: accepted, granting no data by themselves.
pub const NON_RESOURCE: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "online_access",
    "offline_access",
];

/// Parses one scope. `Ok(None)` for a known non-resource scope; `Err` says what is wrong.
pub fn parse(s: &str) -> Result<Option<Scope>, String> {
    if NON_RESOURCE.contains(&s) {
        return Ok(None);
    }
    let (context, rest) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a SMART scope"))?;
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => {
            return Err(format!(
                "'{s}': the context must be patient, user or system"
            ))
        }
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) if !q.is_empty() => (r, Some(q.to_string())),
        Some(_) => return Err(format!("'{s}': empty query")),
        None => (rest, None),
    };
    let (resource, perms) = rest
        .rsplit_once('.')
        .ok_or_else(|| format!("'{s}' has no permissions (e.g. .rs or .read)"))?;
    let resource_ok = resource == "*"
        || (resource.starts_with(|c: char| c.is_ascii_uppercase())
            && resource.chars().all(|c| c.is_ascii_alphanumeric()));
    if !resource_ok {
        return Err(format!("'{s}': '{resource}' is not a resource type or *"));
    }
    let bits = match perms {
        "read" => Perm::Read.bit() | Perm::Search.bit(),
        "write" => Perm::Create.bit() | Perm::Update.bit() | Perm::Delete.bit(),
        "*" => 31,
        v2 => {
            // An order-preserving, non-empty subset of "cruds".
            let mut bits = 0u8;
            let mut next = 0;
            for c in v2.chars() {
                let i = ORDER[next..]
                    .iter()
                    .position(|o| *o == c)
                    .map(|p| p + next)
                    .ok_or_else(|| {
                        format!("'{s}': permissions must be an ordered subset of cruds")
                    })?;
                bits |= 1 << i;
                next = i + 1;
            }
            if bits == 0 {
                return Err(format!("'{s}' grants no permission"));
            }
            bits
        }
    };
    if query.is_some() && resource == "*" {
        return Err(format!("'{s}': a query needs a resource type, not *"));
    }
    Ok(Some(Scope {
        context,
        resource: resource.to_string(),
        perms: bits,
        query,
    }))
}

/// Parses a space-separated scope string, refusing anything malformed.
pub fn parse_all(s: &str) -> Result<Vec<Scope>, String> {
    let mut out = Vec::new();
    for part in s.split_whitespace() {
        if let Some(scope) = parse(part)? {
            out.push(scope);
        }
    }
    Ok(out)
}

/// The scopes of `requested` that `registered` allows, each cut down to what is allowed.
pub fn grant(requested: &[Scope], registered: &[Scope]) -> Vec<Scope> {
    let mut out: Vec<Scope> = requested
        .iter()
        .flat_map(|r| registered.iter().filter_map(move |g| r.intersect(g)))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn render(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Scope {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn v2_permissions_are_ordered_subsets_of_cruds() {
        let s = one("patient/Communication.rs");
        assert!(s.allows(Perm::Read) && s.allows(Perm::Search));
        assert!(!s.allows(Perm::Create) && !s.allows(Perm::Update) && !s.allows(Perm::Delete));
        assert_eq!(s.to_string(), "patient/Communication.rs");
        assert_eq!(one("system/*.cruds").to_string(), "system/*.cruds");
        assert_eq!(one("user/Binary.cd").to_string(), "user/Binary.cd");
        for bad in [
            "patient/Communication.sr",
            "patient/Communication.rr",
            "patient/Communication.",
            "patient/Communication.x",
            "doctor/Communication.rs",
            "patient/communication.rs",
            "patient/*.rs?category=x",
            "Communication.rs",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn v1_scopes_map_to_v2() {
        assert_eq!(
            one("patient/Communication.read").to_string(),
            "patient/Communication.rs"
        );
        assert_eq!(one("user/*.write").to_string(), "user/*.cud");
        assert_eq!(
            one("system/AuditEvent.*").to_string(),
            "system/AuditEvent.cruds"
        );
    }

    #[test]
    fn non_resource_scopes_grant_nothing() {
        assert_eq!(parse("openid").unwrap(), None);
        assert_eq!(parse("launch/patient").unwrap(), None);
        assert!(
            parse_all("openid fhirUser system/Communication.rs")
                .unwrap()
                .len()
                == 1
        );
    }

    #[test]
    fn granted_is_requested_intersected_with_registered() {
        let registered = parse_all("system/Communication.cruds system/Binary.r").unwrap();
        let requested = parse_all("system/*.rs system/AuditEvent.rs").unwrap();
        assert_eq!(
            render(&grant(&requested, &registered)),
            "system/Binary.r system/Communication.rs"
        );
        let user = parse_all("user/Communication.rs").unwrap();
        assert!(grant(&user, &registered).is_empty(), "contexts never mix");
        // A wildcard on either side never yields the audit trail.
        let everything = parse_all("system/*.cruds").unwrap();
        let audit = parse_all("system/AuditEvent.rs").unwrap();
        assert!(grant(&audit, &everything).is_empty());
        assert!(grant(&everything, &audit).is_empty());
        assert_eq!(render(&grant(&audit, &audit)), "system/AuditEvent.rs");
    }

    #[test]
    fn queries_narrow_and_must_agree() {
        let registered = parse_all("patient/Communication.rs?category=alert").unwrap();
        let requested = parse_all("patient/Communication.read").unwrap();
        assert_eq!(
            render(&grant(&requested, &registered)),
            "patient/Communication.rs?category=alert"
        );
        let other = parse_all("patient/Communication.rs?category=notification").unwrap();
        assert!(grant(&other, &registered).is_empty());
    }

    #[test]
    fn star_does_not_name_audit_events() {
        let s = one("system/*.rs");
        assert!(s.names("Communication") && s.names("Binary"));
        assert!(!s.names("AuditEvent"));
        assert!(one("system/AuditEvent.rs").names("AuditEvent"));
    }
}

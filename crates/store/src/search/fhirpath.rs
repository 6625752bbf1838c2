//! The FHIRPath subset that search-parameter expressions use: dotted paths, ` | ` unions,
//! `.where(resolve() is T)`, `(X as T)`, `.as(T)`, `.ofType(T)`; choice elements (`occurrence[x]`)
//! are matched by prefix when no type is named.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    /// `name` restricted to one choice type: `occurrence as dateTime` → `occurrenceDateTime`.
    Choice(String, String),
    /// `.where(resolve() is Patient)`: keep references to that type.
    RefersTo(String),
}

/// A compiled expression: a union of paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    paths: Vec<Vec<Step>>,
}

impl Expression {
    /// Compiles `expr` for resources of `base` (`Resource` matches every type).
    pub fn compile(expr: &str) -> Result<Expression, String> {
        let mut paths = Vec::new();
        for part in expr.split(" | ") {
            let mut p = part.trim();
            while p.starts_with('(') && p.ends_with(')') {
                p = &p[1..p.len() - 1];
            }
            let (path, cast) = match p.split_once(" as ") {
                Some((l, t)) => (l.trim(), Some(t.trim())),
                None => (p, None),
            };
            let mut segs = path.split('.');
            segs.next().ok_or("empty expression")?; // the type name
            let mut steps = Vec::new();
            for seg in segs {
                if let Some(t) = seg
                    .strip_prefix("where(resolve() is ")
                    .and_then(|s| s.strip_suffix(')'))
                {
                    steps.push(Step::RefersTo(t.to_string()));
                } else if let Some(t) = seg
                    .strip_prefix("as(")
                    .or_else(|| seg.strip_prefix("ofType("))
                    .and_then(|s| s.strip_suffix(')'))
                {
                    let Some(Step::Field(name)) = steps.pop() else {
                        return Err(format!("bad cast in '{expr}'"));
                    };
                    steps.push(Step::Choice(name, t.to_string()));
                } else if seg.chars().all(|c| c.is_ascii_alphanumeric()) && !seg.is_empty() {
                    steps.push(Step::Field(seg.to_string()));
                } else {
                    return Err(format!("unsupported FHIRPath '{seg}' in '{expr}'"));
                }
            }
            if let Some(t) = cast {
                let Some(Step::Field(name)) = steps.pop() else {
                    return Err(format!("bad cast in '{expr}'"));
                };
                steps.push(Step::Choice(name, t.to_string()));
            }
            paths.push(steps);
        }
        Ok(Expression { paths })
    }

    /// The values the expression selects in `resource`.
    pub fn eval<'a>(&self, resource: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        for steps in &self.paths {
            let mut cur = vec![resource];
            for step in steps {
                let mut next = Vec::new();
                for v in cur {
                    match step {
                        Step::Field(name) => {
                            if let Some(obj) = v.as_object() {
                                match obj.get(name) {
                                    Some(x) => push_flat(&mut next, x),
                                    None => {
                                        // A choice element named without its type: any variant.
                                        for (k, x) in obj {
                                            if k.len() > name.len()
                                                && k.starts_with(name.as_str())
                                                && k[name.len()..]
                                                    .starts_with(|c: char| c.is_ascii_uppercase())
                                            {
                                                push_flat(&mut next, x);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        Step::Choice(name, ty) => {
                            let key = format!("{name}{}{}", ty[..1].to_ascii_uppercase(), &ty[1..]);
                            if let Some(x) = v.get(&key) {
                                push_flat(&mut next, x);
                            }
                        }
                        Step::RefersTo(ty) => {
                            if let Some(r) = v.get("reference").and_then(Value::as_str) {
                                if r.starts_with(&format!("{ty}/"))
                                    || r.contains(&format!("/{ty}/"))
                                {
                                    next.push(v);
                                }
                            }
                        }
                    }
                }
                cur = next;
            }
            out.extend(cur);
        }
        out
    }
}

fn push_flat<'a>(out: &mut Vec<&'a Value>, v: &'a Value) {
    match v {
        Value::Array(items) => out.extend(items.iter()),
        other => out.push(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn evaluates_paths_unions_casts_and_resolve_filters() {
        let r = json!({"resourceType":"CommunicationRequest",
            "subject":{"reference":"Patient/1"},
            "recipient":[{"reference":"Patient/2"},{"reference":"Practitioner/3"}],
            "occurrenceDateTime":"2024-01-01"});
        let e = Expression::compile("CommunicationRequest.subject.where(resolve() is Patient)")
            .unwrap();
        assert_eq!(e.eval(&r).len(), 1);
        let e = Expression::compile("(CommunicationRequest.occurrence as dateTime)").unwrap();
        assert_eq!(e.eval(&r), vec![&json!("2024-01-01")]);
        let e = Expression::compile("CommunicationRequest.occurrence").unwrap();
        assert_eq!(e.eval(&r).len(), 1);
        let e =
            Expression::compile("CommunicationRequest.recipient | CommunicationRequest.subject")
                .unwrap();
        assert_eq!(e.eval(&r).len(), 3);
        let e =
            Expression::compile("CommunicationRequest.recipient.where(resolve() is Practitioner)")
                .unwrap();
        assert_eq!(e.eval(&r).len(), 1);
        assert!(Expression::compile("Communication.extension('x')").is_err());
    }
}

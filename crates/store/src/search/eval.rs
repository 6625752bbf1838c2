//! Conditions checked in memory against one resource's index entries: the twin of the SQL in
//! [`super::sql`], with the same matches. It decides what the access policy lets a token see of a
//! resource in hand, what reaches a subscription, and the conditions on parameters that have no
//! index rows ([`super::UNSTORED`]), which a search checks on each candidate's body.

use super::index::{Entry, RefParts};
use super::query::{Condition, Prefix, StringMatch, TokenValue};

/// What a condition on the resource row itself (`_id`, `_lastUpdated`) is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub id: &'a str,
    pub last_updated: i64,
}

/// Does a resource with these entries (and, for `_id`/`_lastUpdated`, this row) satisfy `c`?
/// Without a row, a condition on the row is refused rather than guessed.
pub fn admits(c: &Condition, entries: &[Entry], row: Option<Row>) -> bool {
    match c {
        Condition::AnyOf(groups) => groups
            .iter()
            .any(|g| g.iter().all(|c| admits(c, entries, row))),
        Condition::Reference { key, values } => entries.iter().any(|e| match e {
            Entry::Ref {
                param,
                target_type,
                target_id,
                url,
            } if param == key => values
                .iter()
                .any(|v| reference_matches(v, target_type, target_id, url)),
            _ => false,
        }),
        Condition::Token { key, not, values } => {
            let found = entries.iter().any(|e| match e {
                Entry::Token {
                    param,
                    system,
                    code,
                } if param == key => values.iter().any(|v| token_matches(v, system, code)),
                _ => false,
            });
            found != *not
        }
        Condition::Str { key, mode, values } => entries.iter().any(|e| match e {
            Entry::Str { param, norm, raw } if param == key => {
                values.iter().any(|v| string_matches(*mode, v, norm, raw))
            }
            _ => false,
        }),
        Condition::Date { key, values } => {
            let dates: Vec<(i64, i64)> = entries
                .iter()
                .filter_map(|e| match e {
                    Entry::Date { param, lo, hi } if param == key => Some((*lo, *hi)),
                    _ => None,
                })
                .collect();
            if values.iter().all(|(p, _, _)| *p == Prefix::Ne) {
                // As the SQL: a value for the parameter, and none within every one of the values.
                !dates.is_empty()
                    && !dates.iter().any(|&(lo, hi)| {
                        values
                            .iter()
                            .all(|&(_, pl, ph)| date_matches(Prefix::Eq, lo, hi, pl, ph))
                    })
            } else {
                dates.iter().any(|&(lo, hi)| {
                    values
                        .iter()
                        .any(|&(p, pl, ph)| date_matches(p, lo, hi, pl, ph))
                })
            }
        }
        Condition::Missing { key, missing, .. } => {
            let present = entries.iter().any(|e| entry_param(e) == key);
            present != *missing
        }
        Condition::Id { not, ids } => row.is_some_and(|r| ids.iter().any(|i| i == r.id) != *not),
        Condition::LastUpdated(values) => row.is_some_and(|r| {
            values
                .iter()
                .any(|&(p, pl, ph)| date_matches(p, r.last_updated, r.last_updated, pl, ph))
        }),
    }
}

fn entry_param(e: &Entry) -> &str {
    match e {
        Entry::Token { param, .. }
        | Entry::Ref { param, .. }
        | Entry::Date { param, .. }
        | Entry::Str { param, .. } => param,
    }
}

fn reference_matches(
    v: &RefParts,
    target_type: &Option<String>,
    target_id: &Option<String>,
    url: &Option<String>,
) -> bool {
    match (&v.url, &v.target_type, &v.target_id) {
        (Some(u), _, _) => url.as_ref() == Some(u),
        (None, Some(t), Some(id)) => {
            url.is_none() && target_type.as_ref() == Some(t) && target_id.as_ref() == Some(id)
        }
        (None, None, Some(id)) => url.is_none() && target_id.as_ref() == Some(id),
        _ => false,
    }
}

fn token_matches(v: &TokenValue, system: &Option<String>, code: &str) -> bool {
    match v {
        TokenValue::Code(c) => code == c,
        TokenValue::SystemCode(None, Some(c)) => system.is_none() && code == c,
        TokenValue::SystemCode(Some(s), Some(c)) => system.as_ref() == Some(s) && code == c,
        TokenValue::SystemCode(Some(s), None) => system.as_ref() == Some(s),
        TokenValue::SystemCode(None, None) => false,
    }
}

/// As `sql::string_value`: the value is already normalised, but for `:exact`.
fn string_matches(mode: StringMatch, v: &str, norm: &str, raw: &str) -> bool {
    match mode {
        StringMatch::Exact => norm == super::index::normalize_string(v) && raw == v,
        StringMatch::Prefix => norm.starts_with(v),
        StringMatch::Contains => norm.contains(v),
    }
}

/// As `sql::date_cond`: does the stored range `lo..=hi` match the searched range `pl..=ph` under
/// `prefix`?
pub fn date_matches(prefix: Prefix, lo: i64, hi: i64, pl: i64, ph: i64) -> bool {
    match prefix {
        Prefix::Eq => lo >= pl && hi <= ph,
        Prefix::Ne => !(lo >= pl && hi <= ph),
        Prefix::Gt => hi > ph,
        Prefix::Lt => lo < pl,
        Prefix::Ge => hi > ph || (lo >= pl && hi <= ph),
        Prefix::Le => lo < pl || (lo >= pl && hi <= ph),
        Prefix::Sa => lo > ph,
        Prefix::Eb => hi < pl,
        Prefix::Ap => {
            let now = crate::clock::now_micros();
            let w = ((now - pl).abs() / 10).max(86_400_000_000);
            lo <= ph + w && hi >= pl - w
        }
    }
}

/// Does `c` name a parameter that has no index rows ([`super::UNSTORED`]), so that SQL cannot
/// decide it?
pub fn needs_body(c: &Condition) -> bool {
    keys(c).into_iter().any(super::is_unstored)
}

/// The parameter keys `c` names (none for `_id` and `_lastUpdated`).
pub fn keys(c: &Condition) -> Vec<&str> {
    match c {
        Condition::AnyOf(groups) => groups.iter().flatten().flat_map(keys).collect(),
        Condition::Token { key, .. }
        | Condition::Reference { key, .. }
        | Condition::Date { key, .. }
        | Condition::Str { key, .. }
        | Condition::Missing { key, .. } => vec![key.as_str()],
        Condition::Id { .. } | Condition::LastUpdated(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::ParamType;

    fn date(lo: i64, hi: i64) -> Entry {
        Entry::Date {
            param: "T.d".into(),
            lo,
            hi,
        }
    }

    fn cond(values: &[(Prefix, i64, i64)]) -> Condition {
        Condition::Date {
            key: "T.d".into(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn dates_match_as_the_sql_does() {
        // Stored 10..=19 (a day, say), searched 10..=19, 0..=9, 20..=29.
        let e = [date(10, 19)];
        let yes = |p, l, h| admits(&cond(&[(p, l, h)]), &e, None);
        assert!(yes(Prefix::Eq, 10, 19) && !yes(Prefix::Eq, 12, 19));
        assert!(yes(Prefix::Gt, 0, 9) && !yes(Prefix::Gt, 10, 19));
        assert!(yes(Prefix::Lt, 20, 29) && !yes(Prefix::Lt, 10, 19));
        assert!(yes(Prefix::Ge, 10, 19) && yes(Prefix::Ge, 0, 9) && !yes(Prefix::Ge, 20, 29));
        assert!(yes(Prefix::Le, 10, 19) && yes(Prefix::Le, 20, 29) && !yes(Prefix::Le, 0, 9));
        assert!(yes(Prefix::Sa, 0, 9) && !yes(Prefix::Sa, 5, 10));
        assert!(yes(Prefix::Eb, 20, 29) && !yes(Prefix::Eb, 19, 29));
        // `ne`: a value, and none within the searched range; a list of `ne`: none within all.
        assert!(yes(Prefix::Ne, 0, 9) && !yes(Prefix::Ne, 10, 19));
        assert!(
            !admits(&cond(&[(Prefix::Ne, 0, 9)]), &[], None),
            "no value: no match"
        );
        // One value within the range excludes the resource, whatever its others (as the SQL's
        // `rid NOT IN (…)`).
        let two = [date(10, 19), date(30, 39)];
        assert!(!admits(&cond(&[(Prefix::Ne, 10, 19)]), &two, None));
        assert!(admits(&cond(&[(Prefix::Ne, 50, 59)]), &two, None));
        assert!(admits(
            &cond(&[(Prefix::Ne, 10, 19), (Prefix::Ne, 0, 9)]),
            &e,
            None
        ));
        // A list with other prefixes: any value under its own prefix.
        assert!(admits(
            &cond(&[(Prefix::Gt, 50, 59), (Prefix::Ne, 0, 9)]),
            &e,
            None
        ));
    }

    #[test]
    fn tokens_strings_missing_and_the_row() {
        let e = [
            Entry::Token {
                param: "T.t".into(),
                system: Some("http://s".into()),
                code: "a".into(),
            },
            Entry::Token {
                param: "T.t".into(),
                system: None,
                code: "b".into(),
            },
            Entry::Str {
                param: "T.s".into(),
                norm: "courier app".into(),
                raw: "Courier App".into(),
            },
        ];
        let tok = |not, v: TokenValue| Condition::Token {
            key: "T.t".into(),
            not,
            values: vec![v],
        };
        let sc = |s: Option<&str>, c: Option<&str>| {
            TokenValue::SystemCode(s.map(String::from), c.map(String::from))
        };
        assert!(admits(&tok(false, TokenValue::Code("a".into())), &e, None));
        assert!(admits(
            &tok(false, sc(Some("http://s"), Some("a"))),
            &e,
            None
        ));
        assert!(
            !admits(&tok(false, sc(None, Some("a"))), &e, None),
            "|a: no system"
        );
        assert!(admits(&tok(false, sc(None, Some("b"))), &e, None));
        assert!(admits(&tok(false, sc(Some("http://s"), None)), &e, None));
        assert!(!admits(&tok(true, TokenValue::Code("a".into())), &e, None));
        assert!(admits(&tok(true, TokenValue::Code("z".into())), &e, None));
        let s = |mode, v: &str| Condition::Str {
            key: "T.s".into(),
            mode,
            values: vec![v.into()],
        };
        assert!(admits(&s(StringMatch::Prefix, "cour"), &e, None));
        assert!(!admits(&s(StringMatch::Prefix, "app"), &e, None));
        assert!(admits(&s(StringMatch::Contains, "r ap"), &e, None));
        assert!(admits(&s(StringMatch::Exact, "Courier App"), &e, None));
        assert!(!admits(&s(StringMatch::Exact, "courier app"), &e, None));
        let missing = |key: &str, missing| Condition::Missing {
            key: key.into(),
            kind: ParamType::Token,
            missing,
        };
        assert!(
            admits(&missing("T.t", false), &e, None) && !admits(&missing("T.t", true), &e, None)
        );
        assert!(admits(&missing("T.x", true), &e, None));
        let row = Row {
            id: "m1",
            last_updated: 15,
        };
        let id = |not| Condition::Id {
            not,
            ids: vec!["m1".into()],
        };
        assert!(admits(&id(false), &e, Some(row)) && !admits(&id(true), &e, Some(row)));
        assert!(
            !admits(&id(false), &e, None),
            "no row: refused, not guessed"
        );
        let lu = Condition::LastUpdated(vec![(Prefix::Ge, 10, 14)]);
        assert!(admits(&lu, &e, Some(row)));
        let any = Condition::AnyOf(vec![
            vec![id(true)],
            vec![tok(false, TokenValue::Code("b".into()))],
        ]);
        assert!(admits(&any, &e, Some(row)));
        assert!(!admits(&Condition::AnyOf(vec![]), &e, Some(row)));
    }
}

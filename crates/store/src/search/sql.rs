//! Turns a parsed search into SQL over `resources` (alias `r`) and the index tables. The SQL is the
//! same on SQLite and PostgreSQL; every value is a bind, never spliced into the text.

use super::index::RefParts;
use super::query::{Condition, Prefix, SearchRequest, SortKey, StringMatch, TokenValue};
use super::{names, ParamType};
use crate::store::db::Bind;

pub struct Sql {
    pub text: String,
    pub binds: Vec<Bind>,
    /// Over the AuditEvents' own tables (`store::audit_rows`): `audit_events r` for the rows,
    /// `audit_refs` (one copy, no NULLs), `audit_tokens`, and the date as the row's columns.
    audit: bool,
}

impl Sql {
    /// SQL over the tables that hold `res_type`.
    fn of(res_type: &str) -> Sql {
        Sql {
            text: String::new(),
            binds: Vec::new(),
            audit: crate::store::audit_rows::is_audit(res_type),
        }
    }
    /// SQL nested in `self`, over the same tables.
    fn nested(&self) -> Sql {
        Sql {
            text: String::new(),
            binds: Vec::new(),
            audit: self.audit,
        }
    }
    /// The table that holds what `generic` holds for other types.
    fn table(&self, generic: &'static str) -> &'static str {
        match (self.audit, generic) {
            (true, "resources") => "audit_events",
            (true, "idx_token") => "audit_tokens",
            (true, "idx_ref") => "audit_refs",
            _ => generic,
        }
    }
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }
    fn bind(&mut self, b: impl Into<Bind>) {
        self.text.push('?');
        self.binds.push(b.into());
    }
}

/// The SQL dialect details that matter for plans. SQLite has no statistics on a young database,
/// so it is told which index to use; the SQL is otherwise the same on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The hint for a per-resource lookup into an index table (SQLite only): the token, date and
    /// reference tables are keyed by (rid, param, …) themselves (`WITHOUT ROWID`), and SQLite
    /// names that key `sqlite_autoindex_{table}_1` (`NOT INDEXED` would not pin it: on a
    /// `WITHOUT ROWID` table it still weighs the lookup index); the string table has a `_rid`
    /// index.
    fn by_rid(self, table: &str) -> String {
        match self {
            Dialect::Sqlite
                if matches!(table, "idx_token" | "idx_date" | "idx_ref" | "audit_tokens") =>
            {
                format!(" INDEXED BY sqlite_autoindex_{table}_1")
            }
            Dialect::Sqlite => format!(" INDEXED BY {table}_rid"),
            Dialect::Postgres => String::new(),
        }
    }
}

/// How narrow a condition that can drive a search is likely to be, without statistics (lower is
/// narrower): a reference names one resource's referrers; an identifier or a string value is
/// near-unique; other tokens (status, category) and dates match large parts of the store, and
/// `:contains` reads its whole parameter. `None`: cannot drive.
fn drive_rank(c: &Condition) -> Option<u8> {
    match c {
        Condition::Reference { .. } => Some(0),
        Condition::Token {
            not: false, key, ..
        } if key.ends_with("identifier") => Some(1),
        Condition::Str { mode, .. } if *mode != StringMatch::Contains => Some(2),
        Condition::Token { not: false, .. } => Some(3),
        Condition::Date { values, .. } if !values.iter().all(|(p, _, _)| *p == Prefix::Ne) => {
            Some(4)
        }
        Condition::Str { .. } => Some(5),
        _ => None,
    }
}

/// The condition a search is driven from, if any (see [`from_where`]): the
/// narrowest by [`drive_rank`], the first of equals.
fn driver(req: &SearchRequest) -> Option<usize> {
    let resource_free = req.sort.iter().all(|k| matches!(k, SortKey::Param { .. }))
        && !req
            .conditions
            .iter()
            .any(|c| matches!(c, Condition::Id { .. } | Condition::LastUpdated(_)));
    if !resource_free {
        return None;
    }
    // A reference ranks first; sorted by the principal date, its rows also carry that date, so
    // the sort reads nothing else (see `page`).
    (0..req.conditions.len())
        .filter_map(|i| drive_rank(&req.conditions[i]).map(|r| (r, i)))
        .min()
        .map(|(_, i)| i)
}

/// `FROM … WHERE …` for the search (without ORDER BY).
///
/// When a condition narrows through an index table and nothing needs the resource row itself, the
/// search is driven from that condition's matches alone: index rows exist only for the current
/// version of live resources and their parameter key names the type, so `resources` is not touched
/// until the page is chosen (measured: an inbox search over 1,000 matches reads half the pages).
///
/// Driven from a reference, the rows also carry the resource's principal date as `r.at_lo` and
/// `r.at_hi` (see `search::REFERENCE_SORT_DATES`), which [`page`] sorts by when asked to.
fn from_where(
    res_type: &str,
    req: &SearchRequest,
    driver: Option<usize>,
    snapshot: i64,
    dialect: Dialect,
) -> Sql {
    let mut q = Sql::of(res_type);
    if let Some(k) = driver {
        let mut d = q.nested();
        match &req.conditions[k] {
            // Driven from a reference, the rows also carry the principal date (see `page`).
            // Several values are joined by UNION, which drops the duplicates itself. An
            // AuditEvent's reference rows carry its date's end only (an instant's range is the
            // same width on every event, so both orders are the same).
            Condition::Reference { key, values } => {
                let select = match (values.len() == 1, q.audit) {
                    (true, false) => "SELECT DISTINCT rid, at_lo, at_hi",
                    (false, false) => "SELECT rid, at_lo, at_hi",
                    (true, true) => "SELECT DISTINCT rid, at_hi AS at_lo, at_hi",
                    (false, true) => "SELECT rid, at_hi AS at_lo, at_hi",
                };
                reference_rows(&mut d, key, values, select)
            }
            Condition::Token { key, values, .. } => {
                let select = if values.len() == 1 {
                    "SELECT DISTINCT rid"
                } else {
                    "SELECT rid"
                };
                token_rows(&mut d, key, values, select)
            }
            c => {
                condition(&mut d, c, dialect);
                d.text = d
                    .text
                    .strip_prefix("r.rid IN (")
                    .and_then(|t| t.strip_suffix(')'))
                    .expect("driving conditions are IN lists")
                    .replacen("SELECT rid", "SELECT DISTINCT rid", 1);
            }
        }
        q.push(&format!(" FROM ({}) r WHERE r.rid <= ", d.text));
        q.binds.extend(d.binds);
        q.bind(snapshot);
        // An AuditEvent's reference rows are keyed by target, not by event: should one outlive
        // its event (`Store::erase_audits` finds them from the body), it matches nothing.
        if q.audit {
            q.push(" AND EXISTS (SELECT 1 FROM audit_events e WHERE e.rid = r.rid)");
        }
        // The others: broad ones probed per driving row, narrow ones as lists (see `per_row`).
        for (i, c) in req.conditions.iter().enumerate() {
            if i != k {
                q.push(" AND ");
                per_row(&mut q, c, dialect);
            }
        }
        return q;
    }
    if q.audit {
        // Every row is a live AuditEvent; the planner picks between the row id and the date.
        // Each condition is checked per row as beside a driver (a date on the row itself).
        q.push(" FROM audit_events r WHERE r.rid <= ");
        q.bind(snapshot);
        for c in &req.conditions {
            q.push(" AND ");
            per_row(&mut q, c, dialect);
        }
        return q;
    }
    let hint =
        if dialect == Dialect::Sqlite && req.conditions.iter().any(|c| drive_rank(c).is_some()) {
            " NOT INDEXED"
        } else {
            ""
        };
    q.push(&format!(" FROM resources r{hint} WHERE r.res_type = "));
    q.bind(res_type);
    q.push(" AND r.deleted = 0 AND r.rid <= ");
    q.bind(snapshot);
    for c in &req.conditions {
        q.push(" AND ");
        condition(&mut q, c, dialect);
    }
    q
}

/// The page query: the row ids of `count + 1` matches (one extra tells whether there is a next page).
pub fn page(res_type: &str, req: &SearchRequest, snapshot: i64, dialect: Dialect) -> Sql {
    let mut q = ordered(res_type, req, snapshot, dialect);
    q.push(" LIMIT ");
    q.bind(req.count as i64 + 1);
    q.push(" OFFSET ");
    q.bind(req.offset as i64);
    q
}

/// The row ids of the first `limit` matches, in the search's order (the candidates of a search
/// checked on bodies).
pub fn candidates(
    res_type: &str,
    req: &SearchRequest,
    snapshot: i64,
    dialect: Dialect,
    limit: usize,
) -> Sql {
    let mut q = ordered(res_type, req, snapshot, dialect);
    q.push(" LIMIT ");
    q.bind(limit as i64);
    q
}

/// The row ids of every match, in the search's order (no page).
pub fn ordered(res_type: &str, req: &SearchRequest, snapshot: i64, dialect: Dialect) -> Sql {
    let stored = stored_request(req);
    let req = stored.as_ref().unwrap_or(req);
    let mut q = Sql::of(res_type);
    q.push("SELECT r.rid");
    let driver = driver(req);
    let w = from_where(res_type, req, driver, snapshot, dialect);
    q.push(&w.text);
    q.binds.extend(w.binds);
    q.push(" ORDER BY ");
    // Driven from a reference, the principal date is on the driving rows.
    let inline = driver
        .is_some_and(|k| matches!(req.conditions[k], Condition::Reference { .. }))
        .then(|| super::reference_sort_date(res_type))
        .flatten();
    for key in &req.sort {
        match key {
            SortKey::Id { descending } => q.push(if *descending {
                "r.fhir_id DESC"
            } else {
                "r.fhir_id ASC"
            }),
            SortKey::LastUpdated { descending } => q.push(if *descending {
                "r.last_updated DESC"
            } else {
                "r.last_updated ASC"
            }),
            SortKey::Param {
                key, descending, ..
            } if Some(key.as_str()) == inline => q.push(if *descending {
                "r.at_hi DESC NULLS LAST"
            } else {
                "r.at_lo ASC NULLS LAST"
            }),
            // An AuditEvent's date is on its row.
            SortKey::Param {
                kind: ParamType::Date,
                descending,
                ..
            } if q.audit => q.push(if *descending {
                "(SELECT a.at_hi FROM audit_events a WHERE a.rid = r.rid) DESC NULLS LAST"
            } else {
                "(SELECT a.at_lo FROM audit_events a WHERE a.rid = r.rid) ASC NULLS LAST"
            }),
            SortKey::Param {
                key,
                kind,
                descending,
            } => {
                let (table, col) = match kind {
                    ParamType::Date => (
                        "idx_date",
                        if *descending {
                            "MAX(s.hi)"
                        } else {
                            "MIN(s.lo)"
                        },
                    ),
                    ParamType::String => (
                        "idx_string",
                        if *descending {
                            "MAX(s.norm)"
                        } else {
                            "MIN(s.norm)"
                        },
                    ),
                    _ => (
                        q.table("idx_token"),
                        if *descending {
                            "MAX(s.code)"
                        } else {
                            "MIN(s.code)"
                        },
                    ),
                };
                match super::sparse_of(key) {
                    // Its rows in their stored form (`super::SPARSE`): none is the common value,
                    // the empty code is "no value".
                    Some(z) => {
                        let agg = if *descending { "MAX" } else { "MIN" };
                        q.push("(SELECT CASE WHEN COUNT(*) = 0 THEN ");
                        q.bind(z);
                        q.push(&format!(
                            " ELSE {agg}(NULLIF(s.code, '')) END FROM {table} s{} WHERE s.rid = r.rid AND s.param = ",
                            dialect.by_rid(table)
                        ));
                    }
                    None => q.push(&format!(
                        "(SELECT {col} FROM {table} s{} WHERE s.rid = r.rid AND s.param = ",
                        dialect.by_rid(table)
                    )),
                }
                q.bind(names::key(key));
                q.push(if *descending {
                    ") DESC NULLS LAST"
                } else {
                    ") ASC NULLS LAST"
                });
            }
        }
        q.push(", ");
    }
    // Default order: most recently created first; always a total order so pages never overlap.
    q.push(if req.sort.is_empty() {
        "r.rid DESC"
    } else {
        "r.rid ASC"
    });
    q
}

pub fn count(res_type: &str, req: &SearchRequest, snapshot: i64, dialect: Dialect) -> Sql {
    let stored = stored_request(req);
    let req = stored.as_ref().unwrap_or(req);
    let mut q = Sql::of(res_type);
    q.push("SELECT COUNT(*) AS n");
    let w = from_where(res_type, req, driver(req), snapshot, dialect);
    q.push(&w.text);
    q.binds.extend(w.binds);
    q
}

/// Does the live resource `rid` of `res_type` satisfy `c`? (`SELECT r.rid … LIMIT 1`: a row
/// means yes.)
pub fn admits(res_type: &str, rid: i64, c: &Condition, dialect: Dialect) -> Sql {
    admits_many(res_type, &[rid], c, dialect)
}

/// Which of the live resources `rids` meet `c` (one query for many: the unread count checks
/// every unread message against the reader's access condition).
pub fn admits_many(res_type: &str, rids: &[i64], c: &Condition, dialect: Dialect) -> Sql {
    let stored = super::stored_form(c);
    let c = stored.as_ref().unwrap_or(c);
    let mut q = Sql::of(res_type);
    q.push(&format!(
        "SELECT r.rid FROM {} r WHERE r.rid IN (",
        q.table("resources")
    ));
    for (i, rid) in rids.iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        q.bind(*rid);
    }
    q.push(if q.audit {
        ") AND "
    } else {
        ") AND r.deleted = 0 AND "
    });
    condition(&mut q, c, dialect);
    q
}

/// `c` as a SQL predicate over the rows `r` of `res_type` (for history, which is not a search).
pub fn predicate(res_type: &str, c: &Condition, dialect: Dialect) -> Sql {
    let stored = super::stored_form(c);
    let c = stored.as_ref().unwrap_or(c);
    let mut q = Sql::of(res_type);
    condition(&mut q, c, dialect);
    q
}

/// `req` with its conditions on [`super::SPARSE`] parameters in their stored form, if it has any.
fn stored_request(req: &SearchRequest) -> Option<SearchRequest> {
    if req
        .conditions
        .iter()
        .all(|c| super::stored_form(c).is_none())
    {
        return None;
    }
    let mut r = req.clone();
    for c in &mut r.conditions {
        if let Some(s) = super::stored_form(c) {
            *c = s;
        }
    }
    Some(r)
}

/// `{select} FROM idx_ref` rows matching any of `values`: one branch per value, joined by
/// `UNION` (which also drops the duplicates a resource referring to several of them makes). An
/// `OR` of the values inside one `param = ?` branch would be read by SQLite, which keeps no
/// statistics, as a scan of every entry of the parameter (all the store's recipients for
/// `recipient=a,b`); each branch here is one range of `idx_ref_lookup` or `idx_ref_url`.
///
/// A parameter stored as its bases' rows of one type (`search::ALIASES`: `patient` is `subject`
/// pointing at a Patient) reads those rows, each value also required to be of that type.
fn reference_rows(q: &mut Sql, key: &str, values: &[RefParts], select: &str) {
    let table = q.table("idx_ref");
    match super::alias_of(key) {
        None => union_of(q, table, &[key], values, select, reference_value),
        Some((bases, target)) => {
            let typed: Vec<RefParts> = values
                .iter()
                .filter(|v| v.target_type.as_deref().is_none_or(|t| t == target))
                .map(|v| RefParts {
                    target_type: Some(target.to_string()),
                    ..v.clone()
                })
                .collect();
            union_of(q, table, bases, &typed, select, |q, v| {
                reference_value(q, v);
                // An AuditEvent's absolute reference is typed '/' (`audit_rows::URL_TYPE`): the
                // value's own type was checked above.
                if !(q.audit && v.url.is_some()) {
                    q.push(" AND target_type = ");
                    q.bind(names::ty(target));
                }
            })
        }
    }
}

/// `{select} FROM idx_token` rows matching any of `values`, one `UNION` branch per value (see
/// [`reference_rows`]: `code = a OR (system = s AND code = b)` inside one branch scans the
/// parameter).
fn token_rows(q: &mut Sql, key: &str, values: &[TokenValue], select: &str) {
    let table = q.table("idx_token");
    union_of(q, table, &[key], values, select, token_value);
}

/// `SELECT rid FROM idx_string` rows matching any of `values` (already normalised, but for
/// `:exact`), one `UNION` branch per value, each answerable from `idx_string_lookup (param,
/// norm)` (see [`string_value`]).
fn string_rows(q: &mut Sql, key: &str, mode: StringMatch, values: &[String], dialect: Dialect) {
    union_of(q, "idx_string", &[key], values, "SELECT rid", |q, v| {
        string_value(q, mode, v, dialect)
    });
}

/// `{select} FROM {table} WHERE param = ? AND <value>` for each key and value, joined by `UNION`.
fn union_of<V>(
    q: &mut Sql,
    table: &str,
    keys: &[&str],
    values: &[V],
    select: &str,
    value: impl Fn(&mut Sql, &V),
) {
    if values.is_empty() || keys.is_empty() {
        q.push(&format!("{select} FROM {table} WHERE 1 = 0"));
        return;
    }
    for (i, (key, v)) in keys
        .iter()
        .flat_map(|k| values.iter().map(move |v| (k, v)))
        .enumerate()
    {
        if i > 0 {
            q.push(" UNION ");
        }
        q.push(&format!("{select} FROM {table} WHERE param = "));
        q.bind(names::key(key));
        q.push(" AND ");
        value(q, v);
    }
}

/// `EXISTS` (or `NOT EXISTS`) an entry of `table` for the row `r.rid` under `key` matching any of
/// `values`: one probe of the table's (rid, param) index per row checked.
fn exists_per_row<V>(
    q: &mut Sql,
    table: &str,
    key: &str,
    not: bool,
    values: &[V],
    dialect: Dialect,
    value: impl Fn(&mut Sql, &V),
) {
    q.push(&format!(
        "{}EXISTS (SELECT 1 FROM {table} m{} WHERE m.rid = r.rid AND m.param = ",
        if not { "NOT " } else { "" },
        dialect.by_rid(table)
    ));
    q.bind(names::key(key));
    q.push(" AND (");
    if values.is_empty() {
        q.push("1 = 0");
    }
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            q.push(" OR ");
        }
        q.push("(");
        value(q, v);
        q.push(")");
    }
    q.push("))");
}

fn reference_value(q: &mut Sql, v: &RefParts) {
    if q.audit {
        return audit_reference_value(q, v);
    }
    match (&v.url, &v.target_type, &v.target_id) {
        (Some(url), _, _) => {
            q.push("url = ");
            q.bind(url.as_str());
        }
        (None, Some(t), Some(id)) => {
            q.push("target_id = ");
            q.bind(id.as_str());
            q.push(" AND target_type = ");
            q.bind(names::ty(t));
            q.push(" AND url IS NULL");
        }
        (None, None, Some(id)) => {
            q.push("target_id = ");
            q.bind(id.as_str());
            q.push(" AND url IS NULL");
        }
        _ => q.push("1 = 0"),
    }
}

/// [`reference_value`] on `audit_refs`, which has no NULLs: an absolute reference is stored with
/// the type `/` (`store::audit_rows::URL_TYPE`) and its URL as the id; a missing type or id is ''.
fn audit_reference_value(q: &mut Sql, v: &RefParts) {
    use crate::store::audit_rows::URL_TYPE;
    match (&v.url, &v.target_type, &v.target_id) {
        (Some(url), _, _) => {
            q.push("target_id = ");
            q.bind(url.as_str());
            q.push(&format!(" AND target_type = '{URL_TYPE}'"));
        }
        (None, Some(t), Some(id)) => {
            q.push("target_id = ");
            q.bind(id.as_str());
            q.push(" AND target_type = ");
            q.bind(names::ty(t));
        }
        (None, None, Some(id)) => {
            q.push("target_id = ");
            q.bind(id.as_str());
            q.push(&format!(" AND target_type <> '{URL_TYPE}'"));
        }
        _ => q.push("1 = 0"),
    }
}

fn token_value(q: &mut Sql, v: &TokenValue) {
    match v {
        TokenValue::Code(code) => {
            q.push("code = ");
            q.bind(code.as_str());
        }
        TokenValue::SystemCode(None, Some(code)) => {
            q.push("code = ");
            q.bind(code.as_str());
            q.push(" AND system = ''");
        }
        TokenValue::SystemCode(Some(system), Some(code)) => {
            q.push("code = ");
            q.bind(code.as_str());
            q.push(" AND system = ");
            q.bind(names::system(Some(system)).into_owned());
        }
        TokenValue::SystemCode(Some(system), None) => {
            q.push("system = ");
            q.bind(names::system(Some(system)).into_owned());
        }
        TokenValue::SystemCode(None, None) => q.push("1 = 0"),
    }
}

/// A string value: `:exact` also compares the normalised form, and on SQLite a prefix is also a
/// range of `norm` (its `LIKE` alone reads every entry of the parameter: all the store's
/// AuditEvents for `AuditEvent?agent-name=…`). PostgreSQL takes a `LIKE 'prefix%'` to an index
/// range itself under a C collation (the README's PostgreSQL note). `:contains` reads the
/// parameter's entries.
fn string_value(q: &mut Sql, mode: StringMatch, v: &str, dialect: Dialect) {
    match mode {
        StringMatch::Exact => {
            q.push("norm = ");
            q.bind(super::index::normalize_string(v));
            q.push(" AND raw = ");
            q.bind(v);
        }
        StringMatch::Prefix => {
            if dialect == Dialect::Sqlite && !v.is_empty() {
                q.push("norm >= ");
                q.bind(v);
                if let Some(above) = prefix_bound(v) {
                    q.push(" AND norm < ");
                    q.bind(above);
                }
                q.push(" AND ");
            }
            q.push("norm LIKE ");
            q.bind(format!("{}%", like_escape(v)));
            q.push(" ESCAPE '\\'");
        }
        StringMatch::Contains => {
            q.push("norm LIKE ");
            q.bind(format!("%{}%", like_escape(v)));
            q.push(" ESCAPE '\\'");
        }
    }
}

/// `c` checked beside the condition that drives the search, with the same matches as
/// [`condition`]. A broad condition (a status, a category, a date range, a string) is probed per
/// driving row through its table's (rid, param) index, which for tokens and dates also holds
/// the values (migration 000021): as `rid IN (subquery)` SQLite would first list all its matches
/// (every completed message of the store). A narrow one (a reference, an identifier, and the
/// access policy's groups, which name one user or patient and hide drafts) stays
/// `rid IN (subquery)`: its short list is read once, where a probe per driving row would cost
/// more (measured: the user-token inbox at 1M, p50 2.88–3.17 ms with the lists, 12.45 ms with
/// probes).
fn per_row(q: &mut Sql, c: &Condition, dialect: Dialect) {
    match c {
        Condition::Reference { .. } | Condition::AnyOf(_) => condition(q, c, dialect),
        Condition::Token {
            key, not: false, ..
        } if key.ends_with("identifier") => condition(q, c, dialect),
        Condition::Token { key, not, values } => {
            let table = q.table("idx_token");
            exists_per_row(q, table, key, *not, values, dialect, token_value)
        }
        Condition::Str { key, mode, values } => {
            exists_per_row(q, "idx_string", key, false, values, dialect, |q, v| {
                string_value(q, *mode, v, dialect)
            })
        }
        // An AuditEvent's date is on its row: one probe of it per row (a list of every event in
        // the range would be most of the trail for `date=ge…`).
        Condition::Date { values, .. } if q.audit => {
            q.push("EXISTS (SELECT 1 FROM audit_events a WHERE a.rid = r.rid AND ");
            audit_date_values(q, values);
            q.push(")");
        }
        Condition::Date { key, values } => {
            if values.iter().all(|(p, _, _)| *p == Prefix::Ne) {
                // As in `condition`: a value for the parameter, and none within all the values.
                exists_per_row(q, "idx_date", key, false, &[()], dialect, |q, _| {
                    q.push("1 = 1")
                });
                q.push(" AND ");
                exists_per_row(q, "idx_date", key, true, &[()], dialect, |q, _| {
                    for (i, (_, lo, hi)) in values.iter().enumerate() {
                        if i > 0 {
                            q.push(" AND ");
                        }
                        date_cond(q, "lo", "hi", Prefix::Eq, *lo, *hi);
                    }
                });
            } else {
                exists_per_row(q, "idx_date", key, false, values, dialect, |q, v| {
                    date_cond(q, "lo", "hi", v.0, v.1, v.2)
                });
            }
        }
        // Already per row (`:missing`), or on the resource row (never beside a driver).
        c => condition(q, c, dialect),
    }
}

fn condition(q: &mut Sql, c: &Condition, dialect: Dialect) {
    match c {
        // An AuditEvent's id is stored (moved from the generic tables) or derived from its row
        // id, which the store has put in the list as `#rid` (`audit_rows::rid_token`).
        Condition::Id { not, ids } if q.audit => {
            let (rids, stored): (Vec<&String>, Vec<&String>) =
                ids.iter().partition(|i| i.starts_with('#'));
            q.push(if *not { "NOT (" } else { "(" });
            if stored.is_empty() && rids.is_empty() {
                q.push("1 = 0");
            }
            if !stored.is_empty() {
                q.push("COALESCE(r.fhir_id, '') IN (");
                for (i, id) in stored.iter().enumerate() {
                    if i > 0 {
                        q.push(", ");
                    }
                    q.bind(id.as_str());
                }
                q.push(")");
            }
            if !rids.is_empty() {
                // A derived id names a row whose id is not stored (a moved event's is).
                q.push(if stored.is_empty() {
                    "(r.fhir_id IS NULL AND r.rid IN ("
                } else {
                    " OR (r.fhir_id IS NULL AND r.rid IN ("
                });
                for (i, rid) in rids.iter().enumerate() {
                    if i > 0 {
                        q.push(", ");
                    }
                    q.bind(rid[1..].parse::<i64>().unwrap_or(0));
                }
                q.push("))");
            }
            q.push(")");
        }
        Condition::Id { not, ids } => {
            q.push(if *not {
                "r.fhir_id NOT IN ("
            } else {
                "r.fhir_id IN ("
            });
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    q.push(", ");
                }
                q.bind(id.as_str());
            }
            q.push(")");
        }
        Condition::LastUpdated(values) => {
            q.push("(");
            for (i, (p, lo, hi)) in values.iter().enumerate() {
                if i > 0 {
                    q.push(" OR ");
                }
                date_cond(q, "r.last_updated", "r.last_updated", *p, *lo, *hi);
            }
            q.push(")");
        }
        Condition::Missing { key, kind, missing } if q.audit && *kind != ParamType::Token => {
            audit_missing(q, key, *kind, *missing)
        }
        Condition::Missing { key, kind, missing } => {
            q.push(if *missing {
                "NOT EXISTS (SELECT 1 FROM "
            } else {
                "EXISTS (SELECT 1 FROM "
            });
            let t = q.table(table(*kind));
            q.push(t);
            q.push(&format!(" m{} WHERE m.rid = r.rid AND ", dialect.by_rid(t)));
            match super::alias_of(key) {
                Some((bases, target)) => {
                    q.push("m.param IN (");
                    for (i, b) in bases.iter().enumerate() {
                        if i > 0 {
                            q.push(", ");
                        }
                        q.bind(names::key(b));
                    }
                    q.push(") AND m.target_type = ");
                    q.bind(names::ty(target));
                }
                None => {
                    q.push("m.param = ");
                    q.bind(names::key(key));
                }
            }
            q.push(")");
        }
        Condition::Token { key, not, values } => {
            q.push(if *not { "r.rid NOT IN (" } else { "r.rid IN (" });
            token_rows(q, key, values, "SELECT rid");
            q.push(")");
        }
        Condition::Reference { key, values } => {
            q.push("r.rid IN (");
            reference_rows(q, key, values, "SELECT rid");
            q.push(")");
        }
        Condition::Date { values, .. } if q.audit => audit_date(q, values),
        Condition::Date { key, values } => {
            let ne = values.iter().all(|(p, _, _)| *p == Prefix::Ne);
            // `ne` must also match resources whose every value differs, so it negates `eq` over the set.
            if ne {
                // Resources without a value for the parameter match no date search (only :missing).
                q.push(&format!(
                    "EXISTS (SELECT 1 FROM idx_date m{} WHERE m.rid = r.rid AND m.param = ",
                    dialect.by_rid("idx_date")
                ));
                q.bind(names::key(key));
                q.push(") AND r.rid NOT IN (SELECT rid FROM idx_date WHERE param = ");
            } else {
                q.push("r.rid IN (SELECT rid FROM idx_date WHERE param = ");
            }
            q.bind(names::key(key));
            q.push(" AND (");
            for (i, (p, lo, hi)) in values.iter().enumerate() {
                if i > 0 {
                    q.push(if ne { " AND " } else { " OR " });
                }
                let p = if ne { Prefix::Eq } else { *p };
                date_cond(q, "lo", "hi", p, *lo, *hi);
            }
            q.push("))");
        }
        Condition::AnyOf(groups) => {
            if groups.is_empty() {
                q.push("1 = 0");
                return;
            }
            q.push("(");
            for (i, g) in groups.iter().enumerate() {
                if i > 0 {
                    q.push(" OR ");
                }
                q.push("(");
                if g.is_empty() {
                    q.push("1 = 1");
                }
                for (j, c) in g.iter().enumerate() {
                    if j > 0 {
                        q.push(" AND ");
                    }
                    condition(q, c, dialect);
                }
                q.push(")");
            }
            q.push(")");
        }
        Condition::Str { key, mode, values } => {
            q.push("r.rid IN (");
            string_rows(q, key, *mode, values, dialect);
            q.push(")");
        }
    }
}

/// `:missing` on an AuditEvent's reference or date: its references are listed once (their table
/// is keyed for lookup, not by event), its date is its row's.
fn audit_missing(q: &mut Sql, key: &str, kind: ParamType, missing: bool) {
    q.push(if missing {
        "r.rid NOT IN ("
    } else {
        "r.rid IN ("
    });
    match kind {
        ParamType::Reference => {
            q.push("SELECT rid FROM audit_refs WHERE ");
            match super::alias_of(key) {
                Some((bases, target)) => {
                    q.push("param IN (");
                    for (i, b) in bases.iter().enumerate() {
                        if i > 0 {
                            q.push(", ");
                        }
                        q.bind(names::key(b));
                    }
                    q.push(") AND target_type = ");
                    q.bind(names::ty(target));
                }
                None => {
                    q.push("param = ");
                    q.bind(names::key(key));
                }
            }
        }
        ParamType::Date => q.push("SELECT a.rid FROM audit_events a WHERE a.at_lo IS NOT NULL"),
        // No other kind is stored for an AuditEvent (search::UNSTORED): none has a value.
        _ => q.push("SELECT a.rid FROM audit_events a WHERE 1 = 0"),
    }
    q.push(")");
}

/// A condition on an AuditEvent's date, on its row's columns (`ne`: a date, and not within all
/// the values, as for other types).
fn audit_date(q: &mut Sql, values: &[(Prefix, i64, i64)]) {
    q.push("r.rid IN (SELECT a.rid FROM audit_events a WHERE ");
    audit_date_values(q, values);
    q.push(")");
}

/// [`audit_date`]'s test of the row `a`.
fn audit_date_values(q: &mut Sql, values: &[(Prefix, i64, i64)]) {
    let ne = values.iter().all(|(p, _, _)| *p == Prefix::Ne);
    q.push(if ne {
        "a.at_lo IS NOT NULL AND NOT ("
    } else {
        "("
    });
    for (i, (p, lo, hi)) in values.iter().enumerate() {
        if i > 0 {
            q.push(if ne { " AND " } else { " OR " });
        }
        let p = if ne { Prefix::Eq } else { *p };
        date_cond(q, "a.at_lo", "a.at_hi", p, *lo, *hi);
    }
    q.push(")");
}

/// The least string above every string that starts with `prefix`, in code-point order (which is
/// SQLite's byte order of UTF-8): the prefix with its last character stepped up (`ab` → `ac`).
/// `None` when there is none (a prefix of U+10FFFF characters only).
pub fn prefix_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 + 1 {
            0xD800 => Some('\u{E000}'), // over the surrogates, which are not characters
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn table(kind: ParamType) -> &'static str {
    match kind {
        ParamType::Token | ParamType::Uri => "idx_token",
        ParamType::Reference => "idx_ref",
        ParamType::Date => "idx_date",
        ParamType::String => "idx_string",
    }
}

/// FHIR date comparison between the resource's range `[lo_col, hi_col]` and the value `[pl, ph]`.
fn date_cond(q: &mut Sql, lo_col: &str, hi_col: &str, prefix: Prefix, pl: i64, ph: i64) {
    let mut c = |parts: &[(&str, i64)], tail: &str| {
        for (text, v) in parts {
            q.push(text);
            q.bind(*v);
        }
        q.push(tail);
    };
    match prefix {
        Prefix::Eq => c(
            &[
                (&format!("({lo_col} >= "), pl),
                (&format!(" AND {hi_col} <= "), ph),
            ],
            ")",
        ),
        Prefix::Ne => c(
            &[
                (&format!("NOT ({lo_col} >= "), pl),
                (&format!(" AND {hi_col} <= "), ph),
            ],
            ")",
        ),
        Prefix::Gt => c(&[(&format!("{hi_col} > "), ph)], ""),
        Prefix::Lt => c(&[(&format!("{lo_col} < "), pl)], ""),
        Prefix::Ge => c(
            &[
                (&format!("({hi_col} > "), ph),
                (&format!(" OR ({lo_col} >= "), pl),
                (&format!(" AND {hi_col} <= "), ph),
            ],
            "))",
        ),
        Prefix::Le => c(
            &[
                (&format!("({lo_col} < "), pl),
                (&format!(" OR ({lo_col} >= "), pl),
                (&format!(" AND {hi_col} <= "), ph),
            ],
            "))",
        ),
        Prefix::Sa => c(&[(&format!("{lo_col} > "), ph)], ""),
        Prefix::Eb => c(&[(&format!("{hi_col} < "), pl)], ""),
        Prefix::Ap => {
            // Approximately: within 10% of the distance between the value and now (at least a day).
            let now = crate::clock::now_micros();
            let w = ((now - pl).abs() / 10).max(86_400_000_000);
            c(
                &[
                    (&format!("({lo_col} <= "), ph + w),
                    (&format!(" AND {hi_col} >= "), pl - w),
                ],
                ")",
            )
        }
    }
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

#[cfg(test)]
mod tests {
    use super::prefix_bound;

    #[test]
    fn prefix_bound_is_the_least_string_above_the_prefix() {
        assert_eq!(prefix_bound("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_bound("a z").as_deref(), Some("a {"));
        assert_eq!(prefix_bound("zoë").as_deref(), Some("zoì"));
        assert_eq!(prefix_bound("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_bound("\u{10FFFF}"), None);
        // Every string that starts with the prefix sorts below the bound, byte-wise.
        for (prefix, s) in [
            ("ab", "ab\u{10FFFF}\u{10FFFF}"),
            ("zoë", "zoëzzz"),
            ("a\u{10FFFF}", "a\u{10FFFF}z"),
        ] {
            let bound = prefix_bound(prefix).unwrap();
            assert!(
                s.as_bytes() >= prefix.as_bytes() && s.as_bytes() < bound.as_bytes(),
                "{s:?} < {bound:?}"
            );
        }
    }
}

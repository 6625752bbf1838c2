//! Query plans of the passes that run every second over the whole store (SQLite only: it keeps no
//! statistics, so the shape of the SQL decides the plan, and one wrong choice turns a pass into a
//! scan of every message per message). On a store of 1,000,000 messages the escalation pass
//! once answered its per-message `EXISTS` through the (param, code) index and ran for more than
//! ten minutes, every second, while searches waited for a core.

use crate::helpers::*;
use courier::messaging::{escalation, receipts};
use courier::search::{query, sql, Registry};
use diesel::sql_types::{Integer, Text};
use diesel::QueryableByName;

#[derive(QueryableByName, Debug)]
struct PlanLine {
    #[diesel(sql_type = Integer)]
    id: i32,
    #[diesel(sql_type = Integer)]
    parent: i32,
    #[diesel(sql_type = Text)]
    detail: String,
}

/// SQLite's plan for `sql`: each step with the details of the steps it is nested in.
fn plan(app: &TestApp, sql: &str) -> Vec<(String, Vec<String>)> {
    let lines: Vec<PlanLine> = app
        .store
        .query(
            &format!("EXPLAIN QUERY PLAN {sql}"),
            // Any values: the plan is made before they are looked at.
            sql.matches('?').map(|_| "x".into()).collect(),
        )
        .expect("EXPLAIN QUERY PLAN");
    lines
        .iter()
        .map(|l| {
            let mut outer = Vec::new();
            let mut p = l.parent;
            while let Some(up) = lines.iter().find(|u| u.id == p) {
                outer.push(up.detail.clone());
                p = up.parent;
            }
            (l.detail.clone(), outer)
        })
        .collect()
}

/// A test app on SQLite (the plans are SQLite's; PostgreSQL plans by its statistics).
async fn sqlite_app() -> TestApp {
    spawn_app_with(Backend::Sqlite, |_| {})
        .await
        .expect("SQLite needs no set-up")
}

/// `query` (`a=1&b=2`, `%20` for a space) parsed as a search on `res_type`.
fn parsed(app: &TestApp, res_type: &str, query: &str) -> query::SearchRequest {
    let pairs: Vec<(String, String)> = query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.replace("%20", " "))
        })
        .collect();
    let limits = query::Limits {
        default_count: 50,
        max_count: 1000,
        strict: true,
    };
    query::parse(
        &Registry::load().unwrap(),
        res_type,
        &pairs,
        &app.base,
        &limits,
    )
    .unwrap()
}

/// Does a plan step read an index table? The token and date tables are `WITHOUT ROWID`: a step
/// through their own key says `USING PRIMARY KEY` and names only the alias (a `rowid` table's says
/// `USING INTEGER PRIMARY KEY`).
fn names_index_table(detail: &str) -> bool {
    detail.contains(" idx_") || detail.contains(" USING PRIMARY KEY (")
}

/// Every index table probed once per row (inside a correlated subquery) is probed by row id, and
/// no big table is scanned.
fn assert_probes_by_rid(what: &str, steps: &[(String, Vec<String>)]) {
    for (detail, outer) in steps {
        assert!(
            !(detail.starts_with("SCAN ")
                && ["resources", "resource_versions", "idx_"]
                    .iter()
                    .any(|t| detail.contains(t))),
            "{what}: scans a table: {detail}\n{steps:#?}"
        );
        let per_row = outer.iter().any(|o| o.starts_with("CORRELATED"));
        if per_row && names_index_table(detail) {
            assert!(
                detail.contains("_rid (rid=?") || detail.contains(" USING PRIMARY KEY (rid=?"),
                "{what}: a per-message probe goes through a parameter-wide index: {detail}\n{steps:#?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_and_unread_passes_probe_the_index_tables_by_row_id() {
    let app = sqlite_app().await;

    let unread = plan(&app, &escalation::UNREAD_SQL);
    assert_probes_by_rid("escalation, unread urgent messages", &unread);
    let first = unread
        .iter()
        .find(|(d, _)| d.starts_with("SEARCH") || d.starts_with("SCAN"))
        .map(|(d, _)| d.as_str());
    assert_eq!(
        first,
        Some("SEARCH pr USING COVERING INDEX idx_token_lookup (param=? AND code=?)"),
        "the escalation pass is driven from the urgent messages, not from every recent one: {unread:#?}"
    );
    assert!(
        unread
            .iter()
            .any(|(d, o)| d.starts_with("SEARCH s USING") && !o.is_empty()),
        "the status check is there and was looked at: {unread:#?}"
    );

    assert_probes_by_rid(
        "escalation, resolved",
        &plan(&app, escalation::RESOLVED_SQL),
    );
    for targets in [1, 3] {
        let steps = plan(&app, &receipts::unread_sql(targets));
        assert_probes_by_rid("unread summary", &steps);
        assert_no_parameter_scan("unread summary", &steps);
        assert!(
            steps
                .iter()
                .filter(|(d, o)| names_index_table(d) && !o.is_empty())
                .count()
                >= 2,
            "both per-message checks (urgent, withdrawn) were looked at: {steps:#?}"
        );
    }
}

/// The inbox search (`recipient=…&_sort=-sent&_count=50`) reads one range of the reference index
/// and nothing per match: the sort key comes with the index rows. Before, SQLite looked up each
/// match's `sent` in `idx_date` — at 1,000,000 messages ~1,000 random page reads per search — and
/// read each match's `idx_ref` table row for its `url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_search_sorts_from_the_reference_index_alone() {
    let app = sqlite_app().await;
    for (res_type, query) in [
        (
            "Communication",
            "recipient=Practitioner/dr-1&_sort=-sent&_count=50",
        ),
        (
            "Communication",
            "recipient=Practitioner/dr-1,Patient/p-2&_sort=sent",
        ),
        (
            "Communication",
            "status=completed&recipient=Practitioner/dr-1&_sort=-sent",
        ),
        (
            "CommunicationRequest",
            "requester=Practitioner/dr-1&_sort=-authored",
        ),
    ] {
        let req = parsed(&app, res_type, query);
        let q = sql::page(res_type, &req, i64::MAX, sql::Dialect::Sqlite);
        let steps = plan(&app, &q.text);
        assert!(
            // A sort's lookup is the subquery `FROM idx_date s` (through its own key: `SEARCH s
            // USING PRIMARY KEY`); `m` is a condition's per-match probe.
            !steps.iter().any(|(d, _)| d.contains("idx_date") || d.starts_with("SEARCH s USING PRIMARY KEY")),
            "{query}: the sort looks up idx_date: {steps:#?}"
        );
        assert!(
            steps.iter().any(
                |(d, _)| d.starts_with("SEARCH") && d.contains("COVERING INDEX idx_ref_lookup")
            ),
            "{query}: the reference index does not answer the search alone: {steps:#?}"
        );
        assert_probes_by_rid(query, &steps);
        assert_no_parameter_scan(query, &steps);
    }
}

/// Each search of an index table narrows below the parameter: a step that reads a whole
/// parameter's entries (every recipient of the store) fails.
fn assert_no_parameter_scan(what: &str, steps: &[(String, Vec<String>)]) {
    for (detail, _) in steps {
        assert!(
            !(detail.contains(" idx_") && detail.ends_with("(param=?)")),
            "{what}: reads every entry of the parameter: {detail}\n{steps:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_value_of_a_search_reads_one_index_range() {
    // `recipient=a,b` once read every recipient entry of the store: SQLite, without statistics,
    // answered `param = ? AND (… OR …)` by scanning the parameter. And references by absolute URL
    // (idx_ref_url, which holds only those) must still find their index.
    let app = sqlite_app().await;
    for (query, index) in [
        ("recipient=https://other.example/fhir/Practitioner/7", "idx_ref_url (param=? AND url=?)"),
        ("recipient=Practitioner/dr-1,Practitioner/dr-2&_sort=-sent", "idx_ref_lookup (param=? AND target_id=? AND target_type=? AND url=?)"),
        ("recipient=Practitioner/dr-1,https://other.example/fhir/Patient/8&_sort=-sent", "idx_ref_url (param=? AND url=?)"),
        ("recipient=dr-1,Patient/p-2", "idx_ref_lookup (param=? AND target_id=?"),
        ("status=completed&recipient=Practitioner/dr-1,Practitioner/dr-2", "idx_ref_lookup (param=? AND target_id=? AND target_type=? AND url=?)"),
        ("category=notification,http://terminology.hl7.org/CodeSystem/communication-category|alert", "idx_token_lookup (param=? AND code=?"),
        // A negated token never drives: the reference does, the token is probed per match.
        ("category:not=notification,http://terminology.hl7.org/CodeSystem/communication-category|alert&recipient=dr-1", "idx_ref_lookup (param=? AND target_id=?"),
    ] {
        assert_answered_from(&app, "Communication", query, index);
    }
    // Strings: a prefix is a range of the normalised form, :exact an equality on it.
    for (query, index) in [
        (
            "agent-name=cour",
            "idx_string_lookup (param=? AND norm>? AND norm<?)",
        ),
        (
            "agent-name=cour,smart%20app",
            "idx_string_lookup (param=? AND norm>? AND norm<?)",
        ),
        (
            "agent-name:exact=Courier",
            "idx_string_lookup (param=? AND norm=?",
        ),
        (
            "address=127",
            "idx_string_lookup (param=? AND norm>? AND norm<?)",
        ),
    ] {
        assert_answered_from(&app, "AuditEvent", query, index);
    }
}

/// The page and count queries of `query` on `res_type` search `index` and read no parameter whole.
fn assert_answered_from(app: &TestApp, res_type: &str, query: &str, index: &str) {
    let req = parsed(app, res_type, query);
    for q in [
        sql::page(res_type, &req, i64::MAX, sql::Dialect::Sqlite),
        sql::count(res_type, &req, i64::MAX, sql::Dialect::Sqlite),
    ] {
        let steps = plan(app, &q.text);
        assert!(
            steps
                .iter()
                .any(|(d, _)| d.starts_with("SEARCH") && d.contains(index)),
            "{query}: not answered from {index}: {steps:#?}"
        );
        assert_no_parameter_scan(query, &steps);
        assert_probes_by_rid(query, &steps);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_narrowest_condition_drives_and_the_others_are_probed_per_match() {
    // `status=completed&recipient=…` was driven from every completed message of the store, and
    // `recipient=…&sent=ge…` listed every `sent` of the store before looking at the recipient's
    // thousand (4.6–12 s at 1,000,000 messages). Now a reference (or an identifier) drives, and
    // each other condition is one probe of its table's (rid, param) index per match.
    let app = sqlite_app().await;
    let by_recipient = "idx_ref_lookup (param=? AND target_id=? AND target_type=? AND url=?)";
    for (query, index) in [
        ("status=completed&recipient=Practitioner/dr-1", by_recipient),
        (
            "recipient=Practitioner/dr-1&sent=ge2024-06-01&_sort=-sent",
            by_recipient,
        ),
        (
            "sent=ne2024-06-01&recipient=Practitioner/dr-1,Practitioner/dr-2",
            by_recipient,
        ),
        (
            "category:not=alert&status=completed,stopped&recipient=Practitioner/dr-1",
            by_recipient,
        ),
        (
            "medium:missing=true&recipient=Practitioner/dr-1&_sort=sent",
            by_recipient,
        ),
        (
            "category=alert&identifier=http://x|1",
            "idx_token_lookup (param=? AND code=? AND system=?",
        ),
        (
            "sent=lt2024-06-01&status=completed",
            "idx_token_lookup (param=? AND code=?",
        ),
    ] {
        assert_answered_from(&app, "Communication", query, index);
        let req = parsed(&app, "Communication", query);
        let steps = plan(
            &app,
            &sql::page("Communication", &req, i64::MAX, sql::Dialect::Sqlite).text,
        );
        assert!(
            !steps.iter().any(|(d, _)| d.starts_with("LIST SUBQUERY")),
            "{query}: lists a condition's matches before looking at the driver's: {steps:#?}"
        );
        let probes: Vec<&String> = steps
            .iter()
            .filter(|(d, o)| names_index_table(d) && o.iter().any(|o| o.starts_with("CORRELATED")))
            .map(|(d, _)| d)
            .collect();
        assert!(
            probes.len() >= req.conditions.len() - 1,
            "{query}: the other conditions are not probed per match: {steps:#?}"
        );
        // Each probe reads the (rid, param, values) index alone, not the table row too.
        for p in probes {
            assert!(
                p.contains("COVERING INDEX") || p.contains(" USING PRIMARY KEY (rid=?"),
                "{query}: {p}"
            );
        }
    }
}

/// The retention purge finds what is past its period through `resources_retention`, which since
/// issue 24 holds no AuditEvent (a partial index: SQLite uses it only when the query repeats its
/// condition). Without the index each daily pass would read every resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_purge_reads_its_partial_index() {
    use courier::compliance::purge::{EXPIRED_COUNT, EXPIRED_PAGE};
    let app = sqlite_app().await;
    #[derive(QueryableByName)]
    struct Def {
        #[diesel(sql_type = Text)]
        sql: String,
    }
    let def: Vec<Def> = app
        .store
        .query(
            "SELECT sql FROM sqlite_master WHERE name = 'resources_retention'",
            vec![],
        )
        .unwrap();
    assert!(
        def[0].sql.contains("WHERE res_type <> 'AuditEvent'"),
        "{}",
        def[0].sql
    );
    for sql in [EXPIRED_COUNT, EXPIRED_PAGE] {
        let steps = plan(&app, sql);
        assert!(
            steps.iter().any(|(d, _)| d
                .contains("INDEX resources_retention (retention_class=? AND last_updated<?)")),
            "{sql}: {steps:?}"
        );
    }
}

/// A type's history (`Communication/_history`, newest first) reads `resource_versions_type`,
/// which since issue 24 holds no AuditEvent: the history's SQL repeats the index's condition, and
/// reads the versions in the index's order (no sort of every version of the type). AuditEvent's
/// history reads the versions' own key in order (they are most of the versions); one resource's
/// history reads its own versions by rid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_types_history_reads_the_version_index_in_order() {
    use courier::store::history_sql;
    let app = sqlite_app().await;
    let steps = plan(
        &app,
        &format!(
            "{} ORDER BY v.vid DESC LIMIT 10",
            history_sql("Communication", false)
        ),
    );
    assert!(
        steps
            .iter()
            .any(|(d, _)| d.contains("INDEX resource_versions_type (res_type=? AND vid<?)")),
        "{steps:?}"
    );
    let audit = plan(
        &app,
        &format!(
            "{} ORDER BY v.vid DESC LIMIT 10",
            history_sql("AuditEvent", false)
        ),
    );
    for steps in [&steps, &audit] {
        assert!(
            !steps.iter().any(|(d, _)| d.contains("TEMP B-TREE")),
            "sorted without an index: {steps:?}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|(d, _)| d.starts_with("SEARCH v USING INTEGER PRIMARY KEY (rowid<?)")),
        "{audit:?}"
    );
    // One resource's history reads its own versions (by rid), not its type's: a review measured
    // 67 ms against 1 ms at 200,000 versions when the type's index drove it.
    for t in ["Communication", "AuditEvent"] {
        let one = plan(
            &app,
            &format!("{} ORDER BY v.vid DESC LIMIT 10", history_sql(t, true)),
        );
        assert!(
            one.iter().any(|(d, _)| d
                .starts_with("SEARCH v USING INDEX sqlite_autoindex_resource_versions_1 (rid=?)")),
            "{t}: {one:?}"
        );
    }
}

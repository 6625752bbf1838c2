//! Query plans of the passes that run every second over the whole store (SQLite only: it keeps no
//! statistics, so the shape of the SQL decides the plan, and one wrong choice turns a pass into a
//! scan of every message per message). On a store of 1,000,000 messages the escalation pass
//! once answered its per-message `EXISTS` through the (param, code) index and ran for more than
//! ten minutes, every second, while searches waited for a core.

use crate::helpers::*;
use courier::messaging::{escalation, receipts};
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
        if per_row && detail.contains(" idx_") {
            assert!(
                detail.contains("_rid (rid=?"),
                "{what}: a per-message probe goes through a parameter-wide index: {detail}\n{steps:#?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_and_unread_passes_probe_the_index_tables_by_row_id() {
    let app = spawn_app_with(Backend::Sqlite, |_| {})
        .await
        .expect("SQLite needs no set-up");

    let unread = plan(&app, escalation::UNREAD_SQL);
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
        assert!(
            steps
                .iter()
                .filter(|(d, o)| d.contains("idx_token") && !o.is_empty())
                .count()
                >= 2,
            "both per-message checks (urgent, withdrawn) were looked at: {steps:#?}"
        );
    }
}

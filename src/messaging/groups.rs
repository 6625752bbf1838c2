//! Group and CareTeam membership. Integrators keep `Group` (`member.entity`) and `CareTeam`
//! (`participant.member`) resources in Courier; a message whose recipient is one of them reaches
//! every member: the access policy adds "recipient is one of my groups" to a user's compartment,
//! with the memberships looked up from the search index each time a token is used (so a member
//! removed from a group loses REST access at once, and an open socket within 30 s).

use crate::store::db::PooledConn;
use crate::store::{Store, StoreError};
use diesel::sql_types::Text;
use diesel::QueryableByName;

#[derive(QueryableByName)]
struct RefRow {
    #[diesel(sql_type = Text)]
    reference: String,
}

/// The Groups and CareTeams `user` (`Type/id`) is a member of, as `Group/…`/`CareTeam/…`.
pub fn of(store: &Store, user: Option<&str>) -> Result<Vec<String>, StoreError> {
    of_on(store, &mut store.db.get()?, user)
}

/// [`of`] on a connection the caller holds.
pub fn of_on(
    store: &Store,
    c: &mut PooledConn,
    user: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let Some((t, id)) = user.and_then(|u| u.split_once('/')) else {
        return Ok(vec![]);
    };
    let key = |rt: &str, code: &str| store.registry.index_name(rt, code);
    let rows: Vec<RefRow> = store.query_on(
        c,
        "SELECT DISTINCT r.res_type || '/' || r.fhir_id AS reference FROM idx_ref x JOIN resources r ON r.rid = x.rid \
         WHERE x.param IN (?, ?) AND x.target_id = ? AND x.target_type = ? AND x.url IS NULL \
         AND r.deleted = 0 AND r.res_type IN ('Group', 'CareTeam') ORDER BY 1",
        vec![
            key("Group", "member").into(),
            key("CareTeam", "participant").into(),
            id.into(),
            crate::search::names::ty(t).into(),
        ],
    )?;
    Ok(rows.into_iter().map(|r| r.reference).collect())
}

/// The members (`Type/id`, local references) of a Group (`member.entity`) or CareTeam
/// (`participant.member`) stored in Courier, one level deep; empty for any other reference or an
/// unknown group. Blocking.
pub fn members(store: &Store, group: &str) -> Result<Vec<String>, StoreError> {
    let Some((t @ ("Group" | "CareTeam"), id)) = group.split_once('/') else {
        return Ok(vec![]);
    };
    let param = if t == "Group" {
        store.registry.index_name("Group", "member")
    } else {
        store.registry.index_name("CareTeam", "participant")
    };
    let rows: Vec<RefRow> = store.query(
        &format!(
            "SELECT DISTINCT {} || '/' || x.target_id AS reference FROM idx_ref x JOIN resources r ON r.rid = x.rid \
             WHERE r.res_type = ? AND r.fhir_id = ? AND r.deleted = 0 AND x.param = ? \
             AND x.target_type IS NOT NULL AND x.target_id IS NOT NULL ORDER BY 1",
            crate::search::names::type_sql("x.target_type")
        ),
        vec![t.into(), id.into(), param.into()],
    )?;
    Ok(rows.into_iter().map(|m| m.reference).collect())
}

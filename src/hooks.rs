//! What Courier's modules add to the store's transactions ([`crate::store::hooks`]), registered
//! once in [`crate::startup::open_store`] — used by `serve`, every CLI command and the tests alike.
//!
//! - a write of a Communication or CommunicationRequest records its messaging event (the live
//!   channels and subscriptions tail that log), and a CommunicationRequest's schedule is tracked;
//! - an AuditEvent gets its outbox rows (delivery to the EHRs that know its people);
//! - an erased resource takes with it every row a module keeps about it (see
//!   [`crate::compliance::purge`]).

use crate::messaging::events::{self, Kind};
use crate::store::db::Conn;
use crate::store::hooks::{Erased, Written};
use crate::store::{StoreError, WriteStatus};
use serde_json::Value;
use std::sync::Arc;

/// The hooks `serve`, the CLI and the tests run with.
pub fn app() -> Arc<dyn crate::store::hooks::Hooks> {
    Arc::new(App)
}

pub struct App;

crate::forward_hooks!(App, written, audited, erased);

fn written<C: Conn>(c: &mut C, w: &[Written]) -> Result<(), StoreError> {
    // Everything else first: the events go last, so that on PostgreSQL the event lock (taken by
    // the first event) is held only from there to the commit.
    let mut wants = Vec::new();
    for r in w {
        if r.res_type == "CommunicationRequest"
            && !matches!(
                r.status,
                WriteStatus::Existing | WriteStatus::NothingToDelete
            )
        {
            crate::messaging::schedule::track(c, r.id, r.status, r.body)?;
            if let Some(body) = r.body {
                crate::notify::on_escalation(c, r.id, body)?;
            }
        }
        if r.res_type == "Communication" {
            sent_or_drafted(c, r, &mut wants)?;
        }
    }
    crate::notify::flush(c, wants)?;
    let mut logged = Vec::new();
    for r in w {
        let kind = match r.status {
            WriteStatus::Created => Kind::Create,
            WriteStatus::Updated => Kind::Update,
            WriteStatus::Deleted => Kind::Delete,
            WriteStatus::Existing | WriteStatus::NothingToDelete => continue,
        };
        if events::logged(r.res_type) {
            logged.push((kind, r.res_type, r.id, r.version_id, None));
        }
    }
    events::record_all(c, logged)
}

/// A Communication written: the notices of a new message when it is sent — created as sent, or a
/// draft (`preparation`, kept in `draft_messages`) updated out of it (before, a message sent after
/// "Draft saved" reached nobody's email, SMS or push).
fn sent_or_drafted<C: Conn>(
    c: &mut C,
    r: &Written,
    wants: &mut Vec<crate::notify::Want>,
) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
    }
    let status = r
        .body
        .and_then(|b| serde_json::from_slice::<Status>(b).ok())
        .and_then(|s| s.status);
    let sent = matches!(status.as_deref(), Some("completed" | "in-progress"));
    match r.status {
        WriteStatus::Created if status.as_deref() == Some("preparation") => {
            c.execute(
                "INSERT INTO draft_messages (comm_id) VALUES (?) ON CONFLICT (comm_id) DO NOTHING",
                vec![r.id.into()],
            )?;
        }
        WriteStatus::Created => {
            if let Some(body) = r.body {
                crate::notify::on_written(c, r.id, body, wants)?;
            }
        }
        // Still a draft.
        WriteStatus::Updated if status.as_deref() == Some("preparation") => {}
        // Out of draft: sent (its notices now), or withdrawn, deleted — never a new message.
        WriteStatus::Updated | WriteStatus::Deleted => {
            let was_draft = c.execute(
                "DELETE FROM draft_messages WHERE comm_id = ?",
                vec![r.id.into()],
            )? > 0;
            if let (true, true, Some(body)) = (was_draft, sent, r.body) {
                crate::notify::on_written(c, r.id, body, wants)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn audited<C: Conn>(c: &mut C, events: &[(&str, &Value)]) -> Result<(), StoreError> {
    crate::smart::outbox::enqueue(c, events)
}

fn erased<C: Conn>(c: &mut C, e: &[Erased]) -> Result<(), StoreError> {
    crate::compliance::purge::erase_dependents(c, e)
}

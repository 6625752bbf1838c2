//! Bounces that arrive later, as delivery status notifications (RFC 3464): the mail server
//! accepted a notice, then the recipient's server refused it. The bounce mailbox
//! (`COURIER_NOTIFY_BOUNCE_TO`, the envelope sender of every notice) is piped to
//! `courier notify bounce` by the mail system (e.g. a Postfix alias
//! `bounces: "|/usr/local/bin/courier notify bounce"`).
//!
//! The DSN names the notice by the `Message-ID` Courier gave it (`<notice-id@domain>`, in the
//! returned headers) or by its `Original-Envelope-Id`. A permanent failure (`Action: failed`,
//! `Status: 5.x.x`) marks the notice `bounced` and the person's email address undeliverable: no
//! more email notices go to it, and the app asks them for another address. A delay (`delayed`,
//! 4.x.x) is only recorded on the notice.

use crate::store::{Store, StoreError};
use diesel::sql_types::Text;
use diesel::QueryableByName;

/// What a DSN says about one notice.
#[derive(Debug, PartialEq)]
pub struct Dsn {
    pub notice: String,
    pub permanent: bool,
    pub status: String,
    /// The address the report is about (`Final-Recipient: rfc822; …`).
    pub recipient: Option<String>,
}

/// Reads a DSN (the whole message, as the mail system hands it over). `None`: not a DSN about a
/// Courier notice. Only header lines are read (the delivery-status part and the returned
/// headers are plain text by RFC 3464 §2 and RFC 6522), never the returned body.
pub fn parse(raw: &str) -> Option<Dsn> {
    let mut action = None;
    let mut status = None;
    let mut notice = None;
    let mut recipient = None;
    // Header fields may be folded (RFC 5322 §2.2.3): join continuation lines first.
    let mut lines: Vec<String> = vec![];
    for l in raw.lines() {
        let l = l.trim_end_matches('\r');
        if (l.starts_with(' ') || l.starts_with('\t')) && !lines.is_empty() {
            if let Some(last) = lines.last_mut() {
                last.push(' ');
                last.push_str(l.trim());
            }
        } else {
            lines.push(l.to_string());
        }
    }
    for l in &lines {
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "action" if action.is_none() => action = Some(value.to_ascii_lowercase()),
            "status" if status.is_none() => status = Some(value.to_string()),
            "final-recipient" | "original-recipient" if recipient.is_none() => {
                // RFC 3464 §2.3.2: address-type ";" generic-address.
                recipient = value
                    .split_once(';')
                    .map(|(_, a)| {
                        a.trim()
                            .trim_matches(|c| c == '<' || c == '>')
                            .to_ascii_lowercase()
                    })
                    .filter(|a| a.contains('@'));
            }
            // The returned headers of the notice (Courier's Message-ID: <notice-id@domain>), or
            // the envelope id, whichever comes.
            "message-id" | "original-envelope-id" => {
                let id = value.trim_matches(|c| c == '<' || c == '>');
                if let Some((local, _)) = id.split_once('@') {
                    if uuid::Uuid::parse_str(local).is_ok() && notice.is_none() {
                        notice = Some(local.to_string());
                    }
                } else if uuid::Uuid::parse_str(id).is_ok() && notice.is_none() {
                    notice = Some(id.to_string());
                }
            }
            _ => {}
        }
    }
    let action = action?;
    let status = status.unwrap_or_default();
    let permanent = action == "failed" || status.starts_with('5');
    if !permanent && action != "delayed" {
        return None; // delivered, relayed, expanded: nothing to record
    }
    Some(Dsn {
        notice: notice?,
        permanent,
        status: status.chars().take(16).collect(),
        recipient,
    })
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    person: String,
    #[diesel(sql_type = Text)]
    about: String,
}

/// Records a DSN. Returns a line for the operator (no address, no name).
pub fn record(store: &Store, dsn: &Dsn) -> Result<String, StoreError> {
    let rows: Vec<Row> = store.query(
        "SELECT person, about FROM notices WHERE id = ? AND channel = 'email'",
        vec![dsn.notice.clone().into()],
    )?;
    let Some(r) = rows.into_iter().next() else {
        return Ok(format!(
            "notice {} is not a Courier email notice; ignored",
            dsn.notice
        ));
    };
    // Anyone can send mail to the bounce mailbox: the report must be about the address the
    // person has now (a late bounce of an address they have since changed, or a forged report
    // naming another address, changes nothing).
    let current = super::contact(store, &r.person, "email")?.map(|a| a.to_ascii_lowercase());
    if dsn.recipient.is_none() || dsn.recipient != current {
        return Ok(format!(
            "notice {}: the report is not about the person's current address; ignored",
            dsn.notice
        ));
    }
    if !dsn.permanent {
        store.execute(
            "UPDATE notices SET reason = ? WHERE id = ?",
            vec![
                format!("delayed by the recipient's mail server ({})", dsn.status).into(),
                dsn.notice.clone().into(),
            ],
        )?;
        return Ok(format!("notice {}: delayed ({})", dsn.notice, dsn.status));
    }
    let t = crate::clock::now_micros() / 1_000_000;
    store.execute(
        "UPDATE notices SET state = 'bounced', reason = ? WHERE id = ?",
        vec![
            format!("the recipient's mail server refused it ({})", dsn.status).into(),
            dsn.notice.clone().into(),
        ],
    )?;
    store.execute(
        "UPDATE notify_contacts SET bounced_at = ? WHERE person = ? AND kind = 'email'",
        vec![t.into(), r.person.clone().into()],
    )?;
    super::audit(
        store,
        &r.person,
        &r.about,
        "email",
        Some(&format!("bounced ({})", dsn.status)),
    )?;
    Ok(format!(
        "notice {}: bounced ({}); email to this person stops until they give another address",
        dsn.notice, dsn.status
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DSN: &str = "From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail Returned to Sender\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n--b\r\n\
Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n\
Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n\
From: Clinic <no-reply@clinic.example>\r\nTo: gone@example.org\r\nMessage-ID:\r\n <6f1c2b3a-1d2e-4f5a-8b9c-0d1e2f3a4b5c@clinic.example>\r\n--b--\r\n";

    #[test]
    fn a_permanent_failure_names_the_notice() {
        assert_eq!(
            parse(DSN),
            Some(Dsn {
                notice: "6f1c2b3a-1d2e-4f5a-8b9c-0d1e2f3a4b5c".into(),
                permanent: true,
                status: "5.1.1".into(),
                recipient: Some("gone@example.org".into()),
            })
        );
    }

    #[test]
    fn delays_are_not_permanent_and_other_mail_is_ignored() {
        let delayed = DSN
            .replace("Action: failed", "Action: delayed")
            .replace("5.1.1", "4.4.1");
        assert!(!parse(&delayed).unwrap().permanent);
        let delivered = DSN
            .replace("Action: failed", "Action: delivered")
            .replace("5.1.1", "2.0.0");
        assert_eq!(parse(&delivered), None);
        assert_eq!(
            parse("Subject: hello\r\n\r\nAction: failed\r\n"),
            None,
            "no notice named"
        );
    }
}

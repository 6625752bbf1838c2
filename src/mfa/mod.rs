//! Multi-factor sign-in (HIPAA §164.312(d), person or entity authentication).
//!
//! People sign in through their EHR or portal (a SMART launch). Each registered EHR has a policy
//! for its EHR launches and one for its portal's standalone launches:
//! - `off`: the EHR's sign-in is enough;
//! - `trust-ehr` (the default): the EHR's sign-in is enough when its id_token shows a second
//!   factor — `amr` (RFC 8176) with `mfa`/`mca`, a possession factor (`otp`, `hwk`, `sms`, `tel`,
//!   `sc`), a software key unlocked by the person (`swk` with `pin` or a biometric), or two
//!   distinct kinds of factor — or its `acr` is one the registration names; otherwise Courier
//!   asks for its own;
//! - `always`: Courier's own second factor at every sign-in.
//!
//! Courier's own factors ([`factors`]): a passkey (WebAuthn) first, an authenticator app (TOTP)
//! as the fallback, and ten one-time recovery codes made at enrolment. A person with no factor
//! enrols at that sign-in (the EHR's sign-in vouches for them: trust on first use); one with a
//! factor must use it, and cannot enrol another without it. Five wrong answers within 15 minutes
//! lock the person out of Courier's second factor for 15 minutes. Every step is audited (DICOM
//! 110114 User Authentication, with a subtype naming the step, success and failure). The Courier
//! token says how the person authenticated (`amr`). `courier mfa reset --user …` removes a
//! person's factors (a lost phone); `courier mfa policy` sets an EHR's policy.
//!
//! While the second factor is outstanding the finished launch waits in `mfa_tickets`, sealed, for
//! ten minutes: a random ticket (only its SHA-256 is stored) in the page's body names it. The
//! session starts, and the first Courier token is issued, only when a factor has passed.

pub mod factors;

use crate::api::{audit_context, AppState};
use crate::audit;
use crate::smart::launch::{self, SignIn, WEB_APP_CLIENT};
use crate::smart::registry::Ehr;
use crate::store::db::Bind;
use crate::store::{Store, StoreError};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use webauthn_rs::prelude::{
    PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential,
    Url, Uuid, Webauthn, WebauthnBuilder,
};

/// The code system of the AuditEvent subtypes that name each step.
pub const STEP_SYSTEM: &str = "https://courier.example.org/fhir/CodeSystem/mfa-step";
/// How long a sign-in waits for its second factor.
const TICKET_SECS: i64 = 600;
const MAX_BODY: usize = 64 * 1024;

const SCRIPT: &str = include_str!("../../smart-launch/mfa.js");
const STYLE: &str = include_str!("../../smart-launch/mfa.css");

/// An EHR's multi-factor policy for one kind of launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Off,
    TrustEhr,
    /// trust-ehr for reading; without the EHR's second factor the session reads only, and
    /// Courier's own second factor unlocks writing (step-up from the app).
    Writes,
    Always,
}

impl Policy {
    pub fn parse(s: &str) -> anyhow::Result<Policy> {
        match s.trim() {
            "off" => Ok(Policy::Off),
            "trust-ehr" => Ok(Policy::TrustEhr),
            "writes" => Ok(Policy::Writes),
            "always" => Ok(Policy::Always),
            other => anyhow::bail!(
                "the MFA policy must be off, trust-ehr, writes or always, not '{other}'"
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::TrustEhr => "trust-ehr",
            Policy::Writes => "writes",
            Policy::Always => "always",
        }
    }
}

/// Does an `amr` (RFC 8176) show a second factor? `amr` lists every method used, so one method
/// alone (`["otp"]`, `["sms"]`: a passwordless sign-in) is one factor. Two factors are `mfa`, or
/// methods of two kinds — something known (`pwd`, `pin`, `kba`), something held (`otp`, `hwk`,
/// `swk`, `sms`, `tel`, `sc`, `pop`), something one is (`fpt`, `face`, `iris`, `retina`, `vbm`).
/// `mca` (several channels) counts only beside a method of another kind.
pub fn shows_second_factor(amr: &[String]) -> bool {
    let has = |m: &str| amr.iter().any(|a| a == m);
    const KNOW: &[&str] = &["pwd", "pin", "kba"];
    const HAVE: &[&str] = &["otp", "hwk", "swk", "sms", "tel", "sc", "pop"];
    const ARE: &[&str] = &["fpt", "face", "iris", "retina", "vbm"];
    let kinds = [KNOW, HAVE, ARE]
        .iter()
        .filter(|k| k.iter().any(|m| has(m)))
        .count();
    has("mfa") || kinds >= 2 || (has("mca") && kinds >= 1)
}

/// An EHR's policies.
#[derive(Debug, Clone)]
pub struct Settings {
    pub launch: Policy,
    pub portal: Policy,
    /// `acr` values that show a second factor.
    pub acr: Vec<String>,
}

#[derive(QueryableByName)]
struct SettingsRow {
    #[diesel(sql_type = Text)]
    mfa: String,
    #[diesel(sql_type = Text)]
    portal_mfa: String,
    #[diesel(sql_type = Text)]
    mfa_acr: String,
}

pub fn settings(store: &Store, ehr: &str) -> anyhow::Result<Settings> {
    let row = store
        .query::<SettingsRow>(
            "SELECT mfa, portal_mfa, mfa_acr FROM ehrs WHERE name = ?",
            vec![ehr.into()],
        )?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no EHR named {ehr}"))?;
    Ok(Settings {
        // An unreadable policy is the strictest one.
        launch: Policy::parse(&row.mfa).unwrap_or(Policy::Always),
        portal: Policy::parse(&row.portal_mfa).unwrap_or(Policy::Always),
        acr: row.mfa_acr.split_whitespace().map(String::from).collect(),
    })
}

/// Sets an EHR's policies (`courier mfa policy`, `[[ehr]] mfa = …`); `None` keeps a setting.
pub fn set_settings(
    store: &Store,
    ehr: &str,
    launch: Option<&str>,
    portal: Option<&str>,
    acr: Option<&str>,
) -> anyhow::Result<Settings> {
    let mut s = settings(store, ehr)?;
    if let Some(p) = launch {
        s.launch = Policy::parse(p)?;
    }
    if let Some(p) = portal {
        s.portal = Policy::parse(p)?;
    }
    if let Some(a) = acr {
        anyhow::ensure!(
            a.len() <= 1024 && a.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "acr values are space-separated URIs or names"
        );
        s.acr = a.split_whitespace().map(String::from).collect();
    }
    store.execute(
        "UPDATE ehrs SET mfa = ?, portal_mfa = ?, mfa_acr = ? WHERE name = ?",
        vec![
            s.launch.as_str().into(),
            s.portal.as_str().into(),
            s.acr.join(" ").into(),
            ehr.into(),
        ],
    )?;
    Ok(s)
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/smart/mfa", web::get().to(shell))
        .route("/smart/mfa/view", web::post().to(view))
        .route("/smart/mfa.js", web::get().to(script))
        .route("/smart/mfa.css", web::get().to(style))
        .route(
            "/smart/mfa/passkey/register/begin",
            web::post().to(passkey_register_begin),
        )
        .route(
            "/smart/mfa/passkey/register/finish",
            web::post().to(passkey_register_finish),
        )
        .route("/smart/mfa/passkey/begin", web::post().to(passkey_begin))
        .route("/smart/mfa/passkey/finish", web::post().to(passkey_finish))
        .route(
            "/smart/mfa/totp/enrol/begin",
            web::post().to(totp_enrol_begin),
        )
        .route(
            "/smart/mfa/totp/enrol/finish",
            web::post().to(totp_enrol_finish),
        )
        .route("/smart/mfa/totp/verify", web::post().to(totp_verify))
        .route(
            "/smart/mfa/recovery/verify",
            web::post().to(recovery_verify),
        )
        .route("/smart/mfa/complete", web::post().to(complete))
        .route("/smart/mfa/step-up", web::post().to(step_up_writes));
}

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn hash(ticket: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(ticket.as_bytes()))
}

fn aad(ticket_hash: &str) -> String {
    format!("mfa-ticket/{ticket_hash}")
}

/// Audits one step of the second factor (DICOM 110114, subtype Login and the step).
async fn audit_step(
    state: &AppState,
    req: &HttpRequest,
    user: &str,
    step: &str,
    failure: Option<&str>,
) -> Result<(), crate::fhir::outcome::FhirError> {
    crate::api::record_event_checked(state, step_event(state, req, user, step, failure)).await
}

/// [`audit_step`] for a step that happened whether or not its AuditEvent can be recorded now
/// (then it is recorded as it is, once the store takes writes again).
async fn audit_step_as_is(
    state: &AppState,
    req: &HttpRequest,
    user: &str,
    step: &str,
    failure: Option<&str>,
) {
    crate::api::record_event(state, step_event(state, req, user, step, failure)).await
}

fn step_event(
    state: &AppState,
    req: &HttpRequest,
    user: &str,
    step: &str,
    failure: Option<&str>,
) -> Value {
    let mut ctx = audit_context(req, state);
    ctx.client_id = Some(WEB_APP_CLIENT.into());
    ctx.user = Some(user.to_string());
    let mut ev = audit::authentication(&ctx, failure);
    if let Some(subtypes) = ev["subtype"].as_array_mut() {
        subtypes.push(json!({"system": STEP_SYSTEM, "code": step}));
    }
    ev
}

/// The launch's last step: the session starts now when the policy is met, else the person is
/// asked for Courier's second factor.
pub async fn step_up(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    ehr: &Ehr,
    signin: SignIn,
) -> Result<HttpResponse, String> {
    let store = state.store.clone();
    let name = ehr.name.clone();
    let s = web::block(move || settings(&store, &name))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // A patient or a relative always meets the portal's policy, whichever door they came in by;
    // a clinician's standalone launch is the portal's too.
    let patient_side = !signin.user.starts_with("Practitioner/");
    let policy = if signin.portal || patient_side {
        s.portal
    } else {
        s.launch
    };
    let amr_vouches = shows_second_factor(&signin.ehr_amr);
    let vouched = amr_vouches
        || signin
            .ehr_acr
            .as_ref()
            .is_some_and(|a| s.acr.iter().any(|x| x == a));
    let user = signin.user.clone();
    let signed_in = |step: Option<&'static str>| {
        let user = user.clone();
        async move {
            if let Some(step) = step {
                audit_step(state, req, &user, step, None)
                    .await
                    .map_err(|_| "the sign-in could not be recorded; try again".to_string())?;
            }
            launch::audit_login(state, req, Some(user), None).await;
            Ok::<_, String>(())
        }
    };
    match policy {
        Policy::Off => {
            signed_in(None).await?;
            let amr = signin.ehr_amr.clone();
            launch::finish(state, signin, amr).await
        }
        Policy::TrustEhr | Policy::Writes if vouched => {
            signed_in(Some("ehr-asserted")).await?;
            let mut amr = signin.ehr_amr.clone();
            // `mfa` is added only when the EHR's own amr showed two factors (an acr is the
            // EHR's word for it, not a list of methods).
            if amr_vouches && !amr.iter().any(|a| a == "mfa") {
                amr.push("mfa".into());
            }
            launch::finish(state, signin, amr).await
        }
        Policy::Writes => {
            // Reading on the EHR's word; writing after Courier's second factor (`step_up_writes`).
            signed_in(Some("read-only-session")).await?;
            let mut signin = signin;
            signin.scope = read_only(&signin.scope);
            signin.session["step_up"] = json!("writes");
            let amr = signin.ehr_amr.clone();
            launch::finish(state, signin, amr).await
        }
        _ => {
            // The EHR's sign-in passed; the Login is recorded when the second factor has.
            audit_step(state, req, &user, "second-factor-asked", None)
                .await
                .map_err(|_| "the sign-in could not be recorded; try again".to_string())?;
            let frame_origin = signin.frame_origin.clone();
            begin(state, Waiting::SignIn(signin), frame_origin).await
        }
    }
}

/// The read and search permissions of SMART scopes (`user/Communication.cruds` →
/// `user/Communication.rs`); a scope left with none is dropped.
pub fn read_only(scope: &str) -> String {
    scope
        .split_whitespace()
        .filter_map(|one| {
            let (head, perms) = one.rsplit_once('.')?;
            let kept: String = perms.chars().filter(|c| *c == 'r' || *c == 's').collect();
            (!kept.is_empty()).then(|| format!("{head}.{kept}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `POST /smart/mfa/step-up` (form `session=<handle>`): a session that reads only (policy
/// `writes`) asks for Courier's second factor; when it passes, the session and its later tokens
/// may write.
async fn step_up_writes(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let sorry = |text: &str| launch::page(StatusCode::BAD_REQUEST, "Cannot confirm it's you", text);
    if !same_origin(&state, &req) {
        return launch::page(
            StatusCode::FORBIDDEN,
            "Cannot confirm it's you",
            "This request did not come from Courier's own page.",
        );
    }
    let Some(handle) = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "session")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
    else {
        return sorry("Your session has ended. Sign in again from your EHR or portal.");
    };
    let Some(current) = crate::smart::session::current(&state, &handle).await else {
        return sorry("Your session has ended. Sign in again from your EHR or portal.");
    };
    let full = launch::web_app_scope(&current.fhir_user);
    if current.scope == full {
        return sorry("You can send messages already. Go back to Courier.");
    }
    let store = state.store.clone();
    let ehr = current.ehr.clone();
    let frame_origin = web::block(move || crate::smart::registry::get(&store, &ehr))
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten()
        .and_then(|e| reqwest::Url::parse(&e.iss).ok())
        .map(|u| u.origin().ascii_serialization());
    if audit_step(&state, &req, &current.fhir_user, "step-up-begun", None)
        .await
        .is_err()
    {
        return launch::page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Cannot confirm it's you",
            "Courier cannot start this step right now. Try again in a moment.",
        );
    }
    let waiting = Waiting::Upgrade(Upgrade {
        handle_hash: current.handle_hash,
        user: current.fhir_user,
        scope: full.to_string(),
        amr: current.amr,
    });
    match begin(&state, waiting, frame_origin).await {
        Ok(page) => page,
        Err(why) => {
            tracing::warn!(reason = %why, "step-up failed");
            launch::page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot confirm it's you",
                "Courier cannot start this step right now. Try again in a moment.",
            )
        }
    }
}

/// A session that reads only, waiting to be allowed to write.
#[derive(Serialize, Deserialize)]
struct Upgrade {
    handle_hash: String,
    user: String,
    scope: String,
    amr: Vec<String>,
}

/// What waits for the second factor: a sign-in, or a session's step-up.
#[derive(Serialize, Deserialize)]
enum Waiting {
    SignIn(SignIn),
    Upgrade(Upgrade),
}

impl Waiting {
    fn user(&self) -> &str {
        match self {
            Waiting::SignIn(s) => &s.user,
            Waiting::Upgrade(u) => &u.user,
        }
    }
}

/// What waits, sealed, while the second factor is outstanding.
#[derive(Serialize, Deserialize)]
struct Pending {
    waiting: Waiting,
    /// Who may frame the pages of this step (the EHR's origin).
    frame_origin: Option<String>,
    registration: Option<PasskeyRegistration>,
    authentication: Option<PasskeyAuthentication>,
    /// A TOTP secret being enrolled (confirmed by its first code).
    totp_secret: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
struct TicketRow {
    #[diesel(sql_type = Text)]
    user_ref: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    sealed: Vec<u8>,
    #[diesel(sql_type = Nullable<Text>)]
    verified: Option<String>,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
}

async fn begin(
    state: &web::Data<AppState>,
    waiting: Waiting,
    frame_origin: Option<String>,
) -> Result<HttpResponse, String> {
    let ticket = oauth2::CsrfToken::new_random().secret().clone();
    let h = hash(&ticket);
    let user = waiting.user().to_string();
    let step_up = matches!(waiting, Waiting::Upgrade(_));
    let pending = Pending {
        waiting,
        frame_origin: frame_origin.clone(),
        registration: None,
        authentication: None,
        totp_secret: None,
    };
    let store = state.store.clone();
    let u = user.clone();
    let factors = web::block(move || -> Result<_, StoreError> {
        // Waiting sign-ins that were never finished are gone for good (their EHR tokens with them).
        // …and a person has one sign-in waiting at a time (the newest).
        store.execute(
            "DELETE FROM mfa_tickets WHERE expires_at < ? OR user_ref = ?",
            vec![now().into(), u.clone().into()],
        )?;
        let json = serde_json::to_vec(&pending).map_err(|e| anyhow::anyhow!(e))?;
        let (key_id, sealed) = store.keys.seal(&json, &aad(&h));
        store.execute(
            "INSERT INTO mfa_tickets (ticket_hash, user_ref, key_id, sealed, verified, expires_at) VALUES (?, ?, ?, ?, NULL, ?)",
            vec![h.into(), u.clone().into(), key_id.into(), Bind::Blob(sealed), (now() + TICKET_SECS).into()],
        )?;
        Ok((factors::list(&store, &u)?, factors::locked_until(&store, &u)?))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot start the second factor: {e}"))?;
    let _ = (factors, step_up);
    Ok(launch::framed_by(
        bootstrap(&ticket),
        frame_origin.as_deref(),
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Passkeys need a domain name as the relying party (an IP address cannot be one).
fn webauthn(state: &AppState) -> Option<Webauthn> {
    let origin = Url::parse(&state.settings.base_url).ok()?;
    let rp_id = origin.domain()?.to_string();
    WebauthnBuilder::new(&rp_id, &origin)
        .ok()?
        .rp_name("Courier")
        .build()
        .ok()
}

/// When a lockout ends, in words that need no time zone.
fn clock(t: i64) -> String {
    let minutes = ((t - now()) as f64 / 60.0).ceil().max(1.0) as i64;
    if minutes == 1 {
        "in 1 minute".into()
    } else {
        format!("in {minutes} minutes")
    }
}

/// The second-factor page: enrolment for a person with no factor, else the factors they have.
fn page(
    state: &AppState,
    user: &str,
    step_up: bool,
    ticket: &str,
    factors: &[factors::Factor],
    locked_until: Option<i64>,
) -> String {
    let has_passkey = factors.iter().any(|f| f.kind == factors::PASSKEY);
    let has_totp = factors.iter().any(|f| f.kind == factors::TOTP);
    let passkeys = webauthn(state).is_some();
    let enrol = factors.is_empty();
    let hidden = |show: bool| if show { "" } else { " hidden" };
    let staff = user.starts_with("Practitioner/");
    let (heading, intro) = match (enrol, staff) {
        _ if step_up && enrol => (
            "Set up a second step to send messages",
            "You can read messages already. Before you send, Courier asks for a second step. Set it up once; you will use it each time.",
        ),
        _ if step_up => (
            "Confirm it's you to send messages",
            "You can read messages already. Before you send, confirm it's you with your second step.",
        ),
        (true, true) => (
            "Set up a second step for signing in",
            "Courier protects patients' messages with a second step after you sign in. Set it up once; you will use it each time you sign in.",
        ),
        (true, false) => (
            "Set up a second step for signing in",
            "Courier protects your messages with a second step after you sign in. Set it up once; you will use it each time you sign in.",
        ),
        (false, true) => (
            "Confirm it's you",
            "Your organisation asks for a second step before you see patients' messages.",
        ),
        (false, false) => (
            "Confirm it's you",
            "Your care team asks for a second step before you see your messages.",
        ),
    };
    let locked = locked_until.map(|t| {
        format!(
            "Too many wrong attempts. You can try again {}. If you have lost your phone or passkey, contact your clinic or help desk to reset your second step.",
            clock(t)
        )
    });
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{heading} — Courier</title><link rel=\"stylesheet\" href=\"/smart/mfa.css\"></head>\
<body><main id=\"mfa\" data-ticket=\"{ticket}\" data-mode=\"{mode}\" data-step-up=\"{step_up}\">\
<h1>{heading}</h1><p>{intro}</p>{not_now}\
<p id=\"error\" role=\"alert\" class=\"error\" tabindex=\"-1\">{locked}</p>\
<section id=\"enrol\"{enrol_hidden}>\
<h2>Choose how</h2>\
<button type=\"button\" id=\"enrol-passkey\"{passkey_enrol_hidden}>Use a passkey (recommended)</button>\
<p class=\"hint\"{passkey_enrol_hidden}>Your phone or computer confirms it's you with your fingerprint, face or screen lock.</p>\
<button type=\"button\" id=\"enrol-totp\" class=\"secondary\">Use an authenticator app</button>\
<div id=\"totp-setup\" hidden>\
<p>Scan this code with your authenticator app (for example Google Authenticator or Microsoft Authenticator), or type the key below into it.</p>\
<img id=\"totp-qr\" alt=\"QR code to add Courier to your authenticator app\" width=\"200\" height=\"200\">\
<p>Key: <code id=\"totp-secret\"></code></p>\
<form id=\"totp-enrol-form\"><label for=\"totp-enrol-code\">Then enter the 6-digit code the app shows</label>\
<input id=\"totp-enrol-code\" name=\"code\" aria-describedby=\"error\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{{3}} ?[0-9]{{3}}\" maxlength=\"7\" title=\"6 digits\" required>\
<button type=\"submit\">Confirm</button></form></div>\
</section>\
<section id=\"verify\"{verify_hidden}>\
<button type=\"button\" id=\"verify-passkey\"{passkey_verify_hidden}>Use your passkey</button>\
<form id=\"totp-form\"{totp_verify_hidden}><label for=\"totp-code\">6-digit code from your authenticator app</label>\
<input id=\"totp-code\" name=\"code\" aria-describedby=\"error\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{{3}} ?[0-9]{{3}}\" maxlength=\"7\" title=\"6 digits\" required>\
<button type=\"submit\">Verify</button></form>\
<details id=\"recovery\"><summary>Lost your phone or passkey?</summary>\
<form id=\"recovery-form\"><label for=\"recovery-code\">Enter one of your recovery codes</label>\
<input id=\"recovery-code\" name=\"code\" aria-describedby=\"error\" autocomplete=\"off\" spellcheck=\"false\" maxlength=\"40\" required>\
<button type=\"submit\">Use recovery code</button></form>\
<p class=\"hint\">No recovery codes? Contact your clinic or help desk to reset your second step.</p></details>\
</section>\
<section id=\"codes\" hidden><h2>Save your recovery codes</h2>\
<p>If you lose your phone or passkey, each of these codes lets you in once. Keep them somewhere safe: they are shown only now.</p>\
<ol id=\"code-list\"></ol><button type=\"button\" id=\"codes-saved\">I have saved them — continue</button></section>\
<form id=\"done\" method=\"post\" action=\"/smart/mfa/complete\"><input type=\"hidden\" name=\"ticket\" value=\"{ticket}\"></form>\
<p id=\"status\" class=\"hint\" role=\"status\"></p>\
</main><script src=\"/smart/mfa.js\"></script></body></html>",
        heading = esc(heading),
        intro = esc(intro),
        ticket = esc(ticket),
        mode = if enrol { "enrol" } else { "verify" },
        step_up = step_up,
        not_now = if step_up { "<p><a href=\"/app/\">Not now — back to my messages</a></p>" } else { "" },
        locked = esc(locked.as_deref().unwrap_or("")),
        enrol_hidden = hidden(enrol),
        verify_hidden = hidden(!enrol),
        passkey_enrol_hidden = hidden(passkeys),
        passkey_verify_hidden = hidden(has_passkey && passkeys),
        totp_verify_hidden = hidden(has_totp),
    );
    body
}

/// The CSP of the second-step pages.
const PAGE_CSP: &str = "default-src 'none'; base-uri 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'";

/// What the callback (or the step-up) answers: the ticket goes into the tab's sessionStorage and
/// the tab moves to `/smart/mfa` (replacing the callback in its history), so that a reload, Back,
/// or a phone dropping the tab while the person reads their authenticator app does not end the
/// sign-in, and the ticket is never in a URL.
fn bootstrap(ticket: &str) -> HttpResponse {
    // The ticket is URL-safe base64: nothing in it can end the string or the script.
    let ticket: String = ticket
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    launch::script_page(&format!(
        "sessionStorage.setItem(\"courier.mfa\",\"{ticket}\");location.replace(\"/smart/mfa\");"
    ))
}

/// `GET /smart/mfa`: the page the second step runs in; its script asks `/smart/mfa/view` what to
/// show for the ticket this tab holds.
async fn shell(state: web::Data<AppState>) -> HttpResponse {
    let ancestors = match state.settings.frame_ancestors.trim() {
        "" | "'none'" => "'self'".to_string(),
        a => format!("'self' {a}"),
    };
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            format!("{PAGE_CSP}; frame-ancestors {ancestors}"),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .content_type("text/html; charset=utf-8")
        .body(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>Courier</title><link rel=\"stylesheet\" href=\"/smart/mfa.css\"></head>\
<body><main id=\"mfa\"><p id=\"status\" class=\"hint\" role=\"status\">Loading…</p></main>\
<script src=\"/smart/mfa.js\"></script></body></html>",
        )
}

/// `POST /smart/mfa/view` (`{ticket}`): the second-step page for this ticket, as HTML the shell
/// puts in place.
async fn view(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let u = step.user.clone();
    let known = in_store(&state, move |s| {
        Ok((factors::list(s, &u)?, factors::locked_until(s, &u)?))
    })
    .await;
    let (factors, locked) = match known {
        Ok(k) => k,
        Err(r) => return r,
    };
    let ticket = step.body["ticket"].as_str().unwrap_or_default().to_string();
    let step_up = matches!(step.pending.waiting, Waiting::Upgrade(_));
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"html": page(&state, &step.user, step_up, &ticket, &factors, locked)}))
}

async fn script() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .content_type("text/javascript; charset=utf-8")
        .body(SCRIPT)
}

async fn style() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .content_type("text/css; charset=utf-8")
        .body(STYLE)
}

/// A refusal the page shows as it is.
fn refuse(status: StatusCode, error: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"error": error, "message": message}))
}

fn expired() -> HttpResponse {
    refuse(
        StatusCode::BAD_REQUEST,
        "expired",
        "This sign-in has expired. Start again from your EHR or portal.",
    )
}

fn unavailable() -> HttpResponse {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Courier cannot finish this step right now. Try again in a moment.",
    )
}

/// A request to one of the JSON steps: the ticket and what the step needs.
struct Step {
    ticket_hash: String,
    user: String,
    pending: Pending,
    body: Value,
}

/// Did the request come from one of Courier's own pages? A browser says where a request comes
/// from (`Sec-Fetch-Site`, `Origin`): a form another site posts (login CSRF: the attacker's
/// finished sign-in completed in the victim's tab) is refused. A client that is not a browser
/// sends neither and cannot be led to post for someone else.
fn same_origin(state: &AppState, req: &HttpRequest) -> bool {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let site = h("sec-fetch-site");
    if site.is_some_and(|v| v != "same-origin") {
        return false;
    }
    let ours = Url::parse(&state.settings.base_url).map(|u| u.origin().ascii_serialization());
    match (h("origin"), ours) {
        // Courier's pages send no Referer, so a browser posts their forms with `Origin: null`:
        // then only Sec-Fetch-Site can say it was ours.
        (Some("null"), _) => site == Some("same-origin"),
        (Some(origin), Ok(ours)) => origin == ours,
        (Some(_), Err(_)) => false,
        (None, _) => true,
    }
}

/// Reads the request's ticket and the sign-in it names (not yet used, not expired).
async fn load(state: &AppState, req: &HttpRequest, body: &[u8]) -> Result<Step, HttpResponse> {
    if !same_origin(state, req) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "cross_site",
            "This request did not come from Courier's own page.",
        ));
    }
    if body.len() > MAX_BODY {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "The request is too large.",
        ));
    }
    let body: Value = serde_json::from_slice(body).map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request is not JSON.",
        )
    })?;
    let Some(ticket) = body["ticket"]
        .as_str()
        .filter(|t| !t.is_empty() && t.len() <= 128)
    else {
        return Err(expired());
    };
    let h = hash(ticket);
    let store = state.store.clone();
    let h2 = h.clone();
    let row = web::block(move || {
        store.query::<TicketRow>(
            "SELECT user_ref, key_id, sealed, verified, expires_at FROM mfa_tickets WHERE ticket_hash = ?",
            vec![h2.into()],
        )
    })
    .await
    .map_err(|_| unavailable())?
    .map_err(|_| unavailable())?
    .into_iter()
    .next()
    .filter(|r| r.expires_at >= now())
    .ok_or_else(expired)?;
    let plain = state
        .store
        .open_sealed(&row.key_id, &row.sealed, &aad(&h))
        .map_err(|_| unavailable())?;
    let pending: Pending = serde_json::from_slice(&plain).map_err(|_| unavailable())?;
    Ok(Step {
        ticket_hash: h,
        user: row.user_ref,
        pending,
        body,
    })
}

async fn save(
    state: &AppState,
    step: &Step,
    verified: Option<&[&str]>,
) -> Result<(), HttpResponse> {
    let json = serde_json::to_vec(&step.pending).map_err(|_| unavailable())?;
    let (key_id, sealed) = state.store.keys.seal(&json, &aad(&step.ticket_hash));
    let store = state.store.clone();
    let h = step.ticket_hash.clone();
    let verified = verified.map(|v| v.join(" "));
    web::block(move || {
        store.execute(
            "UPDATE mfa_tickets SET key_id = ?, sealed = ?, verified = COALESCE(?, verified) WHERE ticket_hash = ?",
            vec![key_id.into(), Bind::Blob(sealed), verified.into(), h.into()],
        )
    })
    .await
    .map_err(|_| unavailable())?
    .map_err(|_| unavailable())?;
    Ok(())
}

async fn in_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, HttpResponse> {
    let store = state.store.clone();
    web::block(move || f(&store))
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())
}

/// Refuses while the person is locked out (and audits the attempt); nothing is counted.
async fn check_lock(state: &AppState, req: &HttpRequest, user: &str) -> Result<(), HttpResponse> {
    let u = user.to_string();
    if let Some(until) = in_store(state, move |s| factors::locked_until(s, &u)).await? {
        audit_step_as_is(
            state,
            req,
            user,
            "locked-out",
            Some("second factor refused: locked out after repeated wrong attempts"),
        )
        .await;
        return Err(locked(until));
    }
    Ok(())
}

/// Counts an answer before it is checked (see [`factors::attempt`]); refuses while locked out.
async fn count_attempt(
    state: &AppState,
    req: &HttpRequest,
    user: &str,
) -> Result<(), HttpResponse> {
    let u = user.to_string();
    match in_store(state, move |s| factors::attempt(s, &u)).await? {
        factors::Attempt::Go => Ok(()),
        factors::Attempt::Locked(until, started) => {
            let why = if started {
                format!(
                    "locked out for {} minutes after {} wrong attempts",
                    factors::LOCKOUT_SECS / 60,
                    factors::MAX_FAILURES
                )
            } else {
                "second factor refused: locked out after repeated wrong attempts".to_string()
            };
            audit_step_as_is(state, req, user, "locked-out", Some(&why)).await;
            Err(locked(until))
        }
    }
}

fn locked(until: i64) -> HttpResponse {
    HttpResponse::TooManyRequests()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::RETRY_AFTER, (until - now()).max(1).to_string()))
        .json(json!({
            "error": "locked",
            "message": format!("Too many wrong attempts. You can try again {}. If you have lost your phone or passkey, contact your clinic or help desk to reset your second step.", clock(until)),
        }))
}

/// Counts a wrong answer, audits it, and says so (or that the person is now locked out).
async fn wrong(
    state: &AppState,
    req: &HttpRequest,
    user: &str,
    step: &str,
    why: &str,
    message: &str,
) -> HttpResponse {
    let u = user.to_string();
    let lock = in_store(state, move |s| factors::failed(s, &u)).await;
    audit_step_as_is(state, req, user, step, Some(why)).await;
    match lock {
        Ok(Some(until)) => {
            audit_step_as_is(
                state,
                req,
                user,
                "locked-out",
                Some(&format!(
                    "locked out for {} minutes after {} wrong attempts",
                    factors::LOCKOUT_SECS / 60,
                    factors::MAX_FAILURES
                )),
            )
            .await;
            locked(until)
        }
        Ok(None) => refuse(StatusCode::BAD_REQUEST, "wrong", message),
        Err(r) => r,
    }
}

/// A factor passed: the ticket may now complete, and the answer carries the recovery codes when
/// the factor was just enrolled.
async fn passed(
    state: &AppState,
    req: &HttpRequest,
    step: &Step,
    audit_code: &str,
    amr: &[&str],
    enrolled: bool,
) -> HttpResponse {
    if audit_step(state, req, &step.user, audit_code, None)
        .await
        .is_err()
    {
        return unavailable();
    }
    if let Err(r) = save(state, step, Some(amr)).await {
        return r;
    }
    let u = step.user.clone();
    let codes = in_store(state, move |s| {
        factors::record_success(s, &u)?;
        if enrolled {
            Ok(Some(factors::new_recovery_codes(s, &u)?))
        } else {
            Ok(None)
        }
    })
    .await;
    match codes {
        Ok(codes) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({"done": true, "recovery_codes": codes})),
        Err(r) => r,
    }
}

fn user_uuid(user: &str) -> Uuid {
    user.split_once('/')
        .and_then(|(_, id)| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| {
            let d = Sha256::digest(user.as_bytes());
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            Uuid::from_bytes(b)
        })
}

/// Enrolment is for a person with no factor yet; with one, the person must use it.
async fn must_have_none(state: &AppState, user: &str) -> Result<(), HttpResponse> {
    let u = user.to_string();
    if !in_store(state, move |s| factors::list(s, &u))
        .await?
        .is_empty()
    {
        return Err(refuse(
            StatusCode::CONFLICT,
            "enrolled",
            "You have set up a second step already: use it to sign in.",
        ));
    }
    Ok(())
}

async fn passkey_register_begin(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = must_have_none(&state, &step.user).await {
        return r;
    }
    let Some(wa) = webauthn(&state) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_passkeys",
            "Passkeys are not available on this server: use an authenticator app.",
        );
    };
    let display = match &step.pending.waiting {
        Waiting::SignIn(s) => s.session["user_display"]["name"].as_str().map(String::from),
        Waiting::Upgrade(u) => {
            let who = u.user.clone();
            in_store(&state, move |s| {
                crate::smart::identity::summaries(s, &[who])
            })
            .await
            .ok()
            .and_then(|m| m.into_values().next())
            .and_then(|v| v["name"].as_str().map(String::from))
        }
    }
    .unwrap_or_else(|| "Courier user".into());
    let Ok((options, registration)) =
        wa.start_passkey_registration(user_uuid(&step.user), &display, &display, None)
    else {
        return unavailable();
    };
    step.pending.registration = Some(registration);
    if let Err(r) = save(&state, &step, None).await {
        return r;
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(options)
}

async fn passkey_register_finish(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = must_have_none(&state, &step.user).await {
        return r;
    }
    let (Some(wa), Some(registration)) = (webauthn(&state), step.pending.registration.take())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_challenge",
            "Start setting up the passkey again.",
        );
    };
    let credential: Option<RegisterPublicKeyCredential> =
        serde_json::from_value(step.body["credential"].clone()).ok();
    let passkey = credential.and_then(|c| wa.finish_passkey_registration(&c, &registration).ok());
    let Some(passkey) = passkey else {
        // The challenge is used up either way.
        let _ = save(&state, &step, None).await;
        audit_step_as_is(
            &state,
            &req,
            &step.user,
            "passkey-enrolment-refused",
            Some("the passkey's registration did not verify"),
        )
        .await;
        return refuse(
            StatusCode::BAD_REQUEST,
            "wrong",
            "That passkey could not be set up. Try again, or use an authenticator app.",
        );
    };
    let u = step.user.clone();
    if let Err(r) = in_store(&state, move |s| factors::add_passkey(s, &u, &passkey)).await {
        return r;
    }
    passed(
        &state,
        &req,
        &step,
        "passkey-enrolled",
        &["pop", "user", "mfa"],
        true,
    )
    .await
}

async fn passkey_begin(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = check_lock(&state, &req, &step.user).await {
        return r;
    }
    let Some(wa) = webauthn(&state) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_passkeys",
            "Passkeys are not available on this server.",
        );
    };
    let u = step.user.clone();
    let keys = match in_store(&state, move |s| factors::passkeys(s, &u)).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    if keys.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_passkey",
            "You have no passkey: use your authenticator app or a recovery code.",
        );
    }
    let creds: Vec<_> = keys.into_iter().map(|(_, k)| k).collect();
    let Ok((options, authentication)) = wa.start_passkey_authentication(&creds) else {
        return unavailable();
    };
    step.pending.authentication = Some(authentication);
    if let Err(r) = save(&state, &step, None).await {
        return r;
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(options)
}

async fn passkey_finish(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = count_attempt(&state, &req, &step.user).await {
        return r;
    }
    let (Some(wa), Some(authentication)) = (webauthn(&state), step.pending.authentication.take())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_challenge",
            "Start again: press “Use your passkey”.",
        );
    };
    // The challenge is single use, whatever happens next.
    if let Err(r) = save(&state, &step, None).await {
        return r;
    }
    let credential: Option<PublicKeyCredential> =
        serde_json::from_value(step.body["credential"].clone()).ok();
    let result =
        credential.and_then(|c| wa.finish_passkey_authentication(&c, &authentication).ok());
    let Some(result) = result else {
        return wrong(
            &state,
            &req,
            &step.user,
            "passkey-refused",
            "the passkey's assertion did not verify",
            "That passkey was not accepted.",
        )
        .await;
    };
    let u = step.user.clone();
    let updated = in_store(&state, move |s| {
        for (id, mut pk) in factors::passkeys(s, &u)? {
            if pk.cred_id() == result.cred_id() {
                pk.update_credential(&result);
                factors::update_passkey(s, &u, &id, &pk)?;
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await;
    match updated {
        // Removed meanwhile (`courier mfa reset`).
        Ok(false) => {
            wrong(
                &state,
                &req,
                &step.user,
                "passkey-refused",
                "the passkey is no longer registered",
                "That passkey was not accepted.",
            )
            .await
        }
        Ok(true) => {
            passed(
                &state,
                &req,
                &step,
                "passkey-verified",
                &["pop", "user", "mfa"],
                false,
            )
            .await
        }
        Err(r) => r,
    }
}

async fn totp_enrol_begin(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = must_have_none(&state, &step.user).await {
        return r;
    }
    let secret = factors::new_totp_secret();
    let host = Url::parse(&state.settings.base_url)
        .ok()
        .and_then(|u| u.host_str().map(String::from))
        .unwrap_or_else(|| "Courier".into());
    let Ok(totp) = factors::totp(&secret, &host) else {
        return unavailable();
    };
    let Ok(uri) = totp.to_url() else {
        return unavailable();
    };
    let svg = qrcode::QrCode::new(uri.as_bytes()).ok().map(|q| {
        q.render::<qrcode::render::svg::Color>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build()
    });
    step.pending.totp_secret = Some(secret);
    if let Err(r) = save(&state, &step, None).await {
        return r;
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "secret": totp.secret().to_base32(),
            "uri": uri,
            "qr": svg.map(|s| format!("data:image/svg+xml;base64,{}", base64::engine::general_purpose::STANDARD.encode(s))),
        }))
}

fn code_of(step: &Step) -> String {
    step.body["code"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(32)
        .collect()
}

async fn totp_enrol_finish(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = must_have_none(&state, &step.user).await {
        return r;
    }
    let Some(secret) = step.pending.totp_secret.clone() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no_challenge",
            "Start setting up the authenticator app again.",
        );
    };
    let Some(first_step) = factors::totp_step(&secret, &code_of(&step), now()) else {
        audit_step_as_is(
            &state,
            &req,
            &step.user,
            "totp-enrolment-refused",
            Some("the first code did not match"),
        )
        .await;
        return refuse(StatusCode::BAD_REQUEST, "wrong", "That code does not match. Check that your phone's clock is right, and enter the newest code.");
    };
    step.pending.totp_secret = None;
    let u = step.user.clone();
    if let Err(r) = in_store(&state, move |s| {
        factors::add_totp(s, &u, &secret, first_step)
    })
    .await
    {
        return r;
    }
    passed(&state, &req, &step, "totp-enrolled", &["otp", "mfa"], true).await
}

async fn totp_verify(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = count_attempt(&state, &req, &step.user).await {
        return r;
    }
    let (u, code) = (step.user.clone(), code_of(&step));
    match in_store(&state, move |s| factors::check_totp(s, &u, &code)).await {
        Ok(factors::TotpCheck::Accepted) => {
            passed(&state, &req, &step, "totp-verified", &["otp", "mfa"], false).await
        }
        Ok(factors::TotpCheck::Replayed) => {
            wrong(
                &state,
                &req,
                &step.user,
                "totp-replayed",
                "a code that was already used",
                "That code was used already. Wait for the next code and enter it.",
            )
            .await
        }
        Ok(factors::TotpCheck::Wrong) => {
            wrong(
                &state,
                &req,
                &step.user,
                "totp-refused",
                "a wrong code",
                "That code is not right. Enter the newest code from your authenticator app.",
            )
            .await
        }
        Err(r) => r,
    }
}

async fn recovery_verify(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let step = match load(&state, &req, &body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = count_attempt(&state, &req, &step.user).await {
        return r;
    }
    let (u, code) = (step.user.clone(), code_of(&step));
    match in_store(&state, move |s| factors::use_recovery_code(s, &u, &code)).await {
        Ok(true) => {
            passed(
                &state,
                &req,
                &step,
                "recovery-code-used",
                &["otp", "mfa"],
                false,
            )
            .await
        }
        Ok(false) => {
            wrong(
                &state,
                &req,
                &step.user,
                "recovery-code-refused",
                "a wrong or used recovery code",
                "That recovery code is not right, or was used already.",
            )
            .await
        }
        Err(r) => r,
    }
}

/// `POST /smart/mfa/complete` (form `ticket`): the sign-in whose second factor passed starts its
/// session; the ticket is used up.
async fn complete(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let sorry = |text: &str| launch::page(StatusCode::BAD_REQUEST, "Sign-in failed", text);
    if !same_origin(&state, &req) {
        return launch::page(
            StatusCode::FORBIDDEN,
            "Sign-in failed",
            "This request did not come from Courier's own page.",
        );
    }
    let Some(ticket) = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty() && t.len() <= 128)
    else {
        return sorry("This sign-in has expired. Start again from your EHR or portal.");
    };
    let h = hash(&ticket);
    let store = state.store.clone();
    let h2 = h.clone();
    let row = web::block(move || {
        store.query::<TicketRow>(
            "DELETE FROM mfa_tickets WHERE ticket_hash = ? AND verified IS NOT NULL RETURNING user_ref, key_id, sealed, verified, expires_at",
            vec![h2.into()],
        )
    })
    .await;
    let Some(row) = row
        .ok()
        .and_then(|r| r.ok())
        .and_then(|r| r.into_iter().next())
    else {
        return sorry("This sign-in has expired, or its second step was not completed. Start again from your EHR or portal.");
    };
    if row.expires_at < now() {
        return sorry("This sign-in has expired. Start again from your EHR or portal.");
    }
    let pending: Option<Pending> = state
        .store
        .open_sealed(&row.key_id, &row.sealed, &aad(&h))
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok());
    let Some(pending) = pending else {
        return sorry("Courier cannot finish this sign-in. Start again from your EHR or portal.");
    };
    let verified: Vec<String> = row
        .verified
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let with = |mut amr: Vec<String>| {
        for m in &verified {
            if !amr.contains(m) {
                amr.push(m.clone());
            }
        }
        amr
    };
    let done = match pending.waiting {
        Waiting::SignIn(signin) => {
            let amr = with(signin.ehr_amr.clone());
            launch::audit_login(&state, &req, Some(signin.user.clone()), None).await;
            launch::finish(&state, signin, amr).await
        }
        Waiting::Upgrade(u) => {
            let amr = with(u.amr.clone());
            let upgraded_page =
                crate::smart::session::upgrade(&state, &u.handle_hash, &u.scope, &amr)
                    .await
                    .map(|token| {
                        launch::framed_by(upgraded(&token), pending.frame_origin.as_deref())
                    });
            if upgraded_page.is_ok() {
                audit_step_as_is(&state, &req, &u.user, "writes-unlocked", None).await;
            }
            upgraded_page
        }
    };
    match done {
        Ok(page) => page,
        Err(why) => {
            tracing::warn!(reason = %why, "sign-in failed after the second factor");
            launch::page(StatusCode::BAD_GATEWAY, "Sign-in failed", &why)
        }
    }
}

/// After a step-up: the app's stored session gets the new token (which may write) and goes on.
fn upgraded(token: &Value) -> HttpResponse {
    let data = launch::script_json(token);
    launch::script_page(&format!(
        "const k=\"courier.session\";const s=JSON.parse(sessionStorage.getItem(k)||\"null\");\
         if(s){{Object.assign(s,{data});delete s.step_up;sessionStorage.setItem(k,JSON.stringify(s));}}sessionStorage.removeItem(\"courier.mfa\");sessionStorage.removeItem(\"courier.left\");location.replace(\"/app/\");"
    ))
}

/// Who a person is for `courier mfa`: a Courier identity (`Practitioner/…`) or, with an EHR, that
/// EHR's reference for them.
pub fn person(store: &Store, ehr: Option<&str>, user: &str) -> anyhow::Result<String> {
    let Some(ehr) = ehr else {
        anyhow::ensure!(
            ["Patient/", "Practitioner/", "RelatedPerson/"]
                .iter()
                .any(|p| user.starts_with(p)),
            "--user must be Patient/…, Practitioner/… or RelatedPerson/…"
        );
        return Ok(user.to_string());
    };
    crate::smart::identity::courier_reference(store, ehr, user)?
        .ok_or_else(|| anyhow::anyhow!("{ehr} has no {user} known to Courier"))
}

/// `courier mfa reset`: removes a person's factors and recovery codes (audited); their next
/// sign-in enrols anew.
pub fn reset(store: &Store, user: &str, why: &str) -> anyhow::Result<usize> {
    let n = factors::reset(store, user)?;
    let ctx = audit::Context {
        user: Some(user.to_string()),
        ..audit::Context::job(&store.base_url, "mfa reset (command line)")
    };
    let mut ev = audit::authentication(&ctx, None);
    if let Some(subtypes) = ev["subtype"].as_array_mut() {
        subtypes.push(json!({"system": STEP_SYSTEM, "code": "reset"}));
    }
    ev["outcomeDesc"] = json!(format!("second factors reset by an administrator: {why}"));
    store.record_audit(ev)?;
    Ok(n)
}

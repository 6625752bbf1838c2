//! The `courier` command: configuration and telemetry, then the chosen subcommand.

use clap::{Parser, Subcommand};
use courier::auth::tokens::{Grant, Tokens};
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::smart::{identity, registry};
use courier::startup::{open_store, Application};
use std::path::PathBuf;

/// Courier: FHIR R4 secure-messaging server.
///
/// Settings come from built-in defaults, then the optional TOML config file, then the environment:
/// COURIER_LISTEN (default 127.0.0.1:8080), COURIER_BASE_URL (public base URL), COURIER_DATA_DIR
/// (default ./data), COURIER_DATABASE_URL (default SQLite in the data dir; postgres://… selects
/// PostgreSQL), COURIER_MASTER_KEY (base64 of 32 bytes) or COURIER_MASTER_KEY_FILE (default
/// {data dir}/master.key, created with mode 0600 on first start), COURIER_MAX_RESOURCE_BYTES,
/// COURIER_MAX_BINARY_BYTES (default 10 MB), COURIER_DEFAULT_COUNT, COURIER_MAX_COUNT,
/// COURIER_DB_POOL_SIZE, COURIER_SQLITE_SYNCHRONOUS (FULL|NORMAL), COURIER_SQLITE_RESIDENT_MB
/// (keep the SQLite file in memory, default 0 = off), COURIER_WORKERS, COURIER_LOG,
/// COURIER_IDLE_TIMEOUT_SECS (automatic log-off of signed-in users, default 900),
/// COURIER_PREVIOUS_MASTER_KEYS (during a master-key rotation), COURIER_RETENTION (retention
/// classes), COURIER_PURGE_INTERVAL_SECS (default 3600), COURIER_EMERGENCY_ACCESS_MINUTES
/// (default 60); the README and docs/ list the rest.
#[derive(Parser)]
#[command(name = "courier", version, about, long_about)]
struct Cli {
    /// TOML config file (same keys as the settings, in snake_case); also COURIER_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate the database, then serve the FHIR API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective settings (secrets hidden) and exit.
    Config,
    /// Manage the integrators (SMART Backend Services clients) allowed to get tokens.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Manage the EHRs Courier connects to as a SMART client (its keys are published at
    /// {base}/smart/jwks for the EHRs to register).
    #[command(subcommand)]
    Ehr(EhrCommand),
    /// The write-back outbox to EHRs.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Identity mapping between EHRs and Courier.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Email notices of unread messages.
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// Multi-factor sign-in: each EHR's policy, and a person's second factors.
    #[command(subcommand)]
    Mfa(MfaCommand),
    /// The audit trail's integrity.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print everything Courier holds about one patient (their messages, attachments, receipts
    /// and the audit trail of access to their data) as a FHIR Bundle on stdout (GDPR access).
    Export {
        /// The Courier Patient id.
        #[arg(long)]
        patient: String,
    },
    /// Destroy what outlived its retention period (see docs/compliance.md, Retention): every trace of each
    /// expired resource, then the data keys that sealed it. The server does this on its own every
    /// COURIER_PURGE_INTERVAL_SECS on one instance; this runs it now or shows what it would do.
    #[command(group(clap::ArgGroup::new("mode").required(true).args(["dry_run", "now"])))]
    Purge {
        /// Count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remove it now.
        #[arg(long)]
        now: bool,
        /// Judge expiry as of this instant instead of now (RFC 3339), e.g. to preview a date.
        /// A later instant than now only with --dry-run (it would remove what has not expired).
        #[arg(long)]
        as_of: Option<String>,
    },
    /// Erase one patient's messaging data (GDPR Art. 17) with the purge's thoroughness, and
    /// destroy their data keys. Refused while a legal hold covers them. The audit trail stays.
    Erase {
        /// The Courier Patient id.
        #[arg(long)]
        patient: String,
        /// Confirm: erasure cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Legal holds: a patient's or a thread's data is kept past its retention while held.
    #[command(subcommand)]
    Hold(HoldCommand),
    /// Emergency-access ("break the glass") grants, for review.
    #[command(subcommand)]
    Emergency(EmergencyCommand),
    /// Encryption keys at rest: status and rotation.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage Courier's own token-signing keys (published at {base}/auth/jwks).
    #[command(subcommand, name = "signing-key")]
    SigningKey(SigningKeyCommand),
    /// Issue an access token for a registered client, for operators and local testing. The token
    /// is printed on stdout; it is subject to revocation and client removal like any other.
    Token {
        /// The registered client the token is issued to.
        #[arg(long)]
        client_id: String,
        /// Scopes to grant (each must be within the client's registered scopes).
        #[arg(long)]
        scope: String,
        /// The user the token speaks for (a Courier reference such as Practitioner/123).
        #[arg(long)]
        fhir_user: Option<String>,
        /// The patient in context (a Courier Patient id).
        #[arg(long)]
        patient: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Register a client; prints its client_id.
    Add {
        /// A name for people (shown by `client list`).
        #[arg(long)]
        name: String,
        /// Where the client publishes its public keys (https; http only on loopback).
        #[arg(
            long,
            conflicts_with = "jwks_file",
            required_unless_present = "jwks_file"
        )]
        jwks_url: Option<String>,
        /// A file holding the client's public JWK Set.
        #[arg(long)]
        jwks_file: Option<PathBuf>,
        /// Space-separated SMART scopes the client may be granted, e.g.
        /// "system/Communication.cruds system/CommunicationRequest.cruds".
        #[arg(long)]
        scope: String,
    },
    /// List the registered clients.
    List,
    /// Remove a client: its token requests are refused and its tokens stop working at once.
    Remove { client_id: String },
}

#[derive(Subcommand)]
enum EhrCommand {
    /// Register an EHR and make Courier's signing key for it; prints its kid and the JWKS URL to
    /// register at the EHR.
    Add {
        /// A short name (letters, digits, '-', '_').
        #[arg(long)]
        name: String,
        /// The EHR's FHIR base URL (its `iss`; https, or http on loopback).
        #[arg(long)]
        iss: String,
        /// Courier's client id at this EHR.
        #[arg(long)]
        client_id: String,
        /// Courier's signing algorithm for this EHR.
        #[arg(long, default_value = "ES384", value_parser = ["ES384", "RS384"])]
        alg: String,
        /// Scopes to request for user launches.
        #[arg(
            long,
            default_value_t = courier::config::default_launch_scope()
        )]
        launch_scope: String,
        /// Scopes to request for the backend-services connection (AuditEvent write-back).
        #[arg(long, default_value_t = courier::config::default_backend_scope())]
        backend_scope: String,
        /// Identifier systems this EHR is trusted for (space-separated): only identifiers in these
        /// systems join its records to identities another EHR brought (an enterprise MRN, NPI).
        #[arg(long, default_value_t = courier::config::default_trusted_systems())]
        trusted_systems: String,
        /// The token endpoint for the backend-services connection (client_credentials), when the
        /// EHR serves it elsewhere than the discovered one (https, or http on loopback).
        #[arg(long)]
        backend_token_url: Option<String>,
        /// The FHIR base that takes Courier's AuditEvents, when not the iss (https, or http on
        /// loopback).
        #[arg(long)]
        audit_base: Option<String>,
    },
    /// List the registered EHRs.
    List,
    /// Remove an EHR (its launches are refused from then on).
    Remove { name: String },
}

#[derive(Subcommand)]
enum MfaCommand {
    /// Show or set an EHR's multi-factor policy: off (the EHR's sign-in is enough), trust-ehr
    /// (enough when the EHR's id_token shows a second factor in amr/acr, else Courier's own),
    /// writes (as trust-ehr, but without the EHR's second factor the session reads only until
    /// Courier's own unlocks writing), or always (Courier's own second factor at every sign-in).
    Policy {
        /// The EHR's name.
        #[arg(long)]
        ehr: String,
        /// The policy for EHR launches.
        #[arg(long, value_parser = ["off", "trust-ehr", "writes", "always"])]
        launch: Option<String>,
        /// The policy for the EHR's portal (standalone launches).
        #[arg(long, value_parser = ["off", "trust-ehr", "writes", "always"])]
        portal: Option<String>,
        /// acr values of the EHR's id_token that show a second factor (space-separated; "" for none).
        #[arg(long)]
        acr: Option<String>,
    },
    /// A person's second factors (kinds and dates, never secrets) and whether they are locked out.
    Status {
        /// A Courier identity (Practitioner/…, Patient/…, RelatedPerson/…), or with --ehr that
        /// EHR's reference for the person.
        #[arg(long)]
        user: String,
        #[arg(long)]
        ehr: Option<String>,
    },
    /// Remove a person's second factors and recovery codes (a lost phone): their next sign-in
    /// enrols anew. Audited.
    Reset {
        #[arg(long)]
        user: String,
        #[arg(long)]
        ehr: Option<String>,
        /// Why (recorded in the audit trail), e.g. a ticket number.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum NotifyCommand {
    /// Notices per state (pending, sending, sent, skipped, parked, uncertain, bounced) and the
    /// oldest of each.
    Status,
    /// Reads a bounce (a delivery status notification, RFC 3464) on standard input and records it
    /// on its notice; a permanent failure stops email to that address. For the mail system's
    /// pipe from the bounce mailbox (COURIER_NOTIFY_BOUNCE_TO). Exit 0 also for mail that is no
    /// bounce of a notice (it is ignored, so the mail system does not retry).
    Bounce,
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// The backlog per EHR: pending, delivered, the oldest undelivered item and its last error.
    Status,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the tamper-evident audit chain from its first link; names the first broken link
    /// (exit status 1) or prints how many links hold.
    Verify,
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Place a hold on Patient/<id> or Communication/<id> (the thread: the message and its parts).
    Add {
        target: String,
        /// Why (a case or matter reference); required.
        #[arg(long)]
        reason: String,
    },
    /// Release a hold.
    Release { target: String },
    /// List the holds.
    List,
}

#[derive(Subcommand)]
enum EmergencyCommand {
    /// List the grants (newest first): who, which patient, why, when, until when.
    List {
        /// Only grants from the last this many days.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// The current master key, data keys per master key and class, and whether a previous master
    /// key can be retired.
    Status,
    /// Retire every data key (new writes, on every instance, get new ones; old data stays
    /// readable). With --master, also make a new master key current in the key file and re-wrap
    /// every data key under it; the old master key stays in the file, as a previous key, until
    /// `courier keys status` says no data key needs it.
    Rotate {
        #[arg(long)]
        master: bool,
    },
    /// Remove previous master keys that no data key needs any more from the key file.
    ForgetPrevious,
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// List the links refused because they would join two identities (newest first).
    Conflicts,
}

#[derive(Subcommand)]
enum SigningKeyCommand {
    /// Start signing with a new key; the old one stays published until its tokens have expired.
    Rotate,
    /// List the published keys.
    List,
}

fn main() -> anyhow::Result<()> {
    // Everything the server writes (database, WAL, keys, exports) is its own: 0600 / 0700.
    courier::store::private::restrict_umask();
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&settings.log).unwrap_or_else(|_| "info".into()),
        )
        .json()
        .with_current_span(false)
        // Logs go to stderr: stdout carries what commands print (a client id, a token).
        .with_writer(std::io::stderr)
        .init();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Migrate => migrate(&settings),
        Command::Client(cmd) => client(&settings, cmd),
        Command::Ehr(cmd) => ehr(&settings, cmd),
        Command::Audit(AuditCommand::Verify) => audit_verify(&settings),
        Command::Export { patient } => export(&settings, patient),
        Command::Purge {
            dry_run,
            now: _,
            as_of,
        } => purge(&settings, dry_run, as_of),
        Command::Erase { patient, yes } => erase(&settings, patient, yes),
        Command::Hold(cmd) => hold(&settings, cmd),
        Command::Emergency(EmergencyCommand::List { days }) => emergency_list(&settings, days),
        Command::Keys(cmd) => keys(&settings, cmd),
        Command::Outbox(OutboxCommand::Status) => outbox_status(&settings),
        Command::Notify(NotifyCommand::Status) => {
            let store = open_store(&settings)?;
            let rows = courier::notify::status(&store)?;
            if rows.is_empty() {
                println!("no notices");
            }
            for r in rows {
                let oldest = r
                    .oldest
                    .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default();
                println!("{}\t{}\toldest {}", r.state, r.n, oldest);
            }
            Ok(())
        }
        Command::Notify(NotifyCommand::Bounce) => {
            use std::io::Read;
            let mut raw = Vec::new();
            std::io::stdin()
                .take(10 * 1024 * 1024)
                .read_to_end(&mut raw)?;
            let raw = String::from_utf8_lossy(&raw);
            match courier::notify::bounce::parse(&raw) {
                Some(dsn) => {
                    let store = open_store(&settings)?;
                    println!("{}", courier::notify::bounce::record(&store, &dsn)?);
                }
                None => println!("not a bounce of a Courier notice; ignored"),
            }
            Ok(())
        }
        Command::Identity(IdentityCommand::Conflicts) => identity_conflicts(&settings),
        Command::Mfa(cmd) => mfa(&settings, cmd),
        Command::SigningKey(cmd) => signing_key(&settings, cmd),
        Command::Token {
            client_id,
            scope,
            fhir_user,
            patient,
        } => token(&settings, client_id, scope, fhir_user, patient),
        Command::Config => config(&settings),
    }
}

fn mfa(settings: &Settings, cmd: MfaCommand) -> anyhow::Result<()> {
    let store = open_store(settings)?;
    match cmd {
        MfaCommand::Policy {
            ehr,
            launch,
            portal,
            acr,
        } => {
            let s = courier::mfa::set_settings(
                &store,
                &ehr,
                launch.as_deref(),
                portal.as_deref(),
                acr.as_deref(),
            )?;
            println!(
                "{ehr}\tlaunch={}\tportal={}\tacr={}",
                s.launch.as_str(),
                s.portal.as_str(),
                s.acr.join(" ")
            );
        }
        MfaCommand::Status { user, ehr } => {
            let user = courier::mfa::person(&store, ehr.as_deref(), &user)?;
            let factors = courier::mfa::factors::list(&store, &user)?;
            let date = |t: i64| {
                chrono::DateTime::from_timestamp(t, 0)
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default()
            };
            println!("{user}");
            if factors.is_empty() {
                println!("  no second factor: the next sign-in that needs one enrols");
            }
            for f in factors {
                println!(
                    "  {}\tadded {}\tlast used {}",
                    f.kind,
                    date(f.created_at),
                    f.last_used_at.map(date).unwrap_or_else(|| "never".into())
                );
            }
            println!(
                "  recovery codes left: {}",
                courier::mfa::factors::recovery_codes_left(&store, &user)?
            );
            if let Some(until) = courier::mfa::factors::locked_until(&store, &user)? {
                println!("  locked out until {}", date(until));
            }
        }
        MfaCommand::Reset { user, ehr, reason } => {
            anyhow::ensure!(!reason.trim().is_empty(), "--reason is required");
            let user = courier::mfa::person(&store, ehr.as_deref(), &user)?;
            let n = courier::mfa::reset(&store, &user, reason.trim())?;
            println!("{user}: {n} second factor(s) removed; the next sign-in enrols anew");
        }
    }
    Ok(())
}

fn print_key_status(store: &courier::store::Store) -> anyhow::Result<()> {
    let st = store.key_status()?;
    println!("current master key: {}", st.current_master);
    println!(
        "{:<22} {:<14} {:>8} {:>8}",
        "master key", "class", "active", "retired"
    );
    for r in &st.rows {
        println!(
            "{:<22} {:<14} {:>8} {:>8}",
            r.master_key_id, r.class, r.active, r.retired
        );
    }
    for (m, n) in &st.pending {
        println!(
            "previous master key {m} still wraps {n} data keys (re-wrap in progress: keep it)"
        );
    }
    for m in &st.retirable {
        println!("previous master key {m} wraps no data key: it can be retired (`courier keys forget-previous`)");
    }
    Ok(())
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async {
        let app = Application::build(settings.clone())?;
        tracing::info!(listen = %settings.listen, base_url = %settings.base_url, database = %app.store.db.backend_name(), "Courier is serving FHIR R4");
        app.run_until_stopped().await?;
        anyhow::Ok(())
    })
}

fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    tracing::info!(database = %store.db.backend_name(), "migrations applied");
    Ok(())
}

fn client(settings: &Settings, cmd: ClientCommand) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    match cmd {
        ClientCommand::Add {
            name,
            jwks_url,
            jwks_file,
            scope,
        } => {
            let keys = match (jwks_url, jwks_file) {
                (Some(u), _) => clients::KeySource::Url(u),
                (None, Some(f)) => clients::KeySource::Document(
                    std::fs::read_to_string(&f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
                ),
                (None, None) => anyhow::bail!("give --jwks-url or --jwks-file"),
            };
            println!("{}", clients::add(&store, &name, keys, &scope)?);
        }
        ClientCommand::List => {
            for c in clients::list(&store)? {
                println!(
                    "{}\t{}\t{}\t{}",
                    c.client_id,
                    c.name,
                    c.jwks_url.as_deref().unwrap_or("(registered JWKS)"),
                    c.scopes
                );
            }
        }
        ClientCommand::Remove { client_id } => {
            if !clients::remove(&store, &client_id)? {
                anyhow::bail!("no client {client_id}");
            }
            println!("removed {client_id}");
        }
    }
    Ok(())
}

fn ehr(settings: &Settings, cmd: EhrCommand) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    match cmd {
        EhrCommand::Add {
            name,
            iss,
            client_id,
            alg,
            launch_scope,
            backend_scope,
            trusted_systems,
            backend_token_url,
            audit_base,
        } => {
            let ehr = registry::add(
                &store,
                &registry::NewEhr {
                    name: &name,
                    iss: &iss,
                    client_id: &client_id,
                    alg: &alg,
                    launch_scopes: &launch_scope,
                    backend_scopes: &backend_scope,
                    trusted_systems: &trusted_systems,
                    backend_token_url: backend_token_url.as_deref(),
                    audit_base: audit_base.as_deref(),
                },
            )?;
            println!(
                "{}\t{}\t{}/smart/jwks",
                ehr.name, ehr.kid, settings.base_url
            );
        }
        EhrCommand::List => {
            for e in registry::list(&store)? {
                // The overrides, when set, after the fixed columns.
                let mut extra = String::new();
                if let Some(u) = &e.backend_token_url {
                    extra.push_str(&format!("\tbackend_token_url={u}"));
                }
                if let Some(u) = &e.audit_base {
                    extra.push_str(&format!("\taudit_base={u}"));
                }
                println!(
                    "{}\t{}\t{}\t{}\t{}{extra}",
                    e.name, e.iss, e.client_id, e.alg, e.kid
                );
            }
        }
        EhrCommand::Remove { name } => {
            if !registry::remove(&store, &name)? {
                anyhow::bail!("no EHR {name}");
            }
            println!("removed {name}");
        }
    }
    Ok(())
}

fn audit_verify(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    match courier::audit::chain::verify(&store)? {
        courier::audit::chain::Verdict::Intact { links, unsealed } => {
            println!("the audit chain is intact: {links} links ({unsealed} recent AuditEvents not sealed yet)");
            Ok(())
        }
        courier::audit::chain::Verdict::Broken { seq, audit_id, why } => {
            if audit_id.is_empty() {
                println!("BROKEN at link {seq}: {why}");
            } else {
                println!("BROKEN at link {seq} (AuditEvent/{audit_id}): {why}");
            }
            std::process::exit(1);
        }
    }
}

fn export(settings: &Settings, patient: String) -> anyhow::Result<()> {
    anyhow::ensure!(
        fhir_codec::is_valid_id(&patient),
        "not a valid Patient id: {patient}"
    );
    let store = open_store(&settings)?;
    let bundle = courier::messaging::export::everything(
        &store,
        &patient,
        courier::messaging::export::Viewer::Administrator,
    )?;
    // The export is a disclosure: audited like the API's.
    let ctx = courier::audit::Context::job(&store.base_url, "export (command line)");
    let what = format!("Patient/{patient}");
    store.record_audit(courier::audit::event(
        &ctx,
        courier::audit::Interaction::Operation,
        Some(&what),
        Some(&what),
        None,
    ))?;
    println!("{bundle}");
    Ok(())
}

fn purge(settings: &Settings, dry_run: bool, as_of: Option<String>) -> anyhow::Result<()> {
    let as_of = match as_of {
        Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
            .map_err(|e| {
                anyhow::anyhow!(
                    "--as-of must be an RFC 3339 instant such as 2027-01-31T00:00:00Z: {e}"
                )
            })?
            .timestamp_micros(),
        None => courier::clock::now_micros(),
    };
    // Removing as of a later date would destroy what has not expired yet: only previewed.
    if !dry_run && as_of > courier::clock::now_micros() + 60_000_000 {
        anyhow::bail!(
            "--as-of is later than now: that would remove data that has not expired yet. Use it with --dry-run to preview that date; nothing was changed"
        );
    }
    let store = open_store(&settings)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} resources ({eta} left)",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(if dry_run { "checking" } else { "purging" });
    let tick = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let summary = courier::compliance::purge::purge(&store, as_of, dry_run, Some(&tick))?;
    bar.finish_and_clear();
    let verb = if dry_run { "would remove" } else { "removed" };
    for (class, n) in &summary.classes {
        println!("{class:>14}: {verb} {n} resources");
    }
    println!(
        "{:>14}: {} resources kept under a legal hold",
        "held", summary.held
    );
    if !dry_run {
        println!(
            "{:>14}: {} versions, {} data keys destroyed, {} audit-chain links cut, {} outbox rows",
            "in all",
            summary.versions,
            summary.keys_destroyed,
            summary.audit_links_cut,
            summary.outbox_rows
        );
    }
    Ok(())
}

fn erase(settings: &Settings, patient: String, yes: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        fhir_codec::is_valid_id(&patient),
        "not a valid Patient id: {patient}"
    );
    anyhow::ensure!(
        yes,
        "erasure cannot be undone: add --yes to erase Patient/{patient}'s messaging data"
    );
    let store = open_store(&settings)?;
    let ctx = courier::audit::Context::job(&store.base_url, "erasure (command line)");
    let s = courier::compliance::purge::erase_patient(&store, &patient, &ctx)?;
    println!("erased Patient/{patient}: {} resources, {} versions, {} data keys destroyed; {} messages kept because they are also another patient's",
        s.resources(), s.versions, s.keys_destroyed, s.shared);
    Ok(())
}

fn hold(settings: &Settings, cmd: HoldCommand) -> anyhow::Result<()> {
    use courier::compliance::purge::{check_target, list_holds, place_hold, release_hold};
    let store = open_store(&settings)?;
    match cmd {
        HoldCommand::Add { target, reason } => {
            check_target(&target).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(!reason.trim().is_empty(), "a legal hold needs a reason");
            if place_hold(&store, &target, &reason)? {
                println!("hold placed on {target}");
            } else {
                println!("{target} was already on hold");
            }
        }
        HoldCommand::Release { target } => {
            anyhow::ensure!(release_hold(&store, &target)?, "no hold on {target}");
            println!("hold on {target} released");
        }
        HoldCommand::List => {
            for h in list_holds(&store)? {
                println!(
                    "{}\t{}\t{}",
                    h.target,
                    courier::search::dates::format_instant(h.created_at),
                    h.reason
                );
            }
        }
    }
    Ok(())
}

fn emergency_list(settings: &Settings, days: i64) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    let since = courier::clock::now_micros() - days * 86_400_000_000;
    use courier::search::dates::format_instant;
    for g in courier::compliance::emergency::list(&store, since)? {
        println!(
            "{}\t{}\tPatient/{}\tuntil {}\t{}",
            format_instant(g.granted_at),
            g.user_ref,
            g.patient,
            format_instant(g.expires_at),
            g.reason
        );
    }
    Ok(())
}

fn keys(settings: &Settings, cmd: KeysCommand) -> anyhow::Result<()> {
    if matches!(
        cmd,
        KeysCommand::Rotate { master: true } | KeysCommand::ForgetPrevious
    ) {
        anyhow::ensure!(
            settings.master_key.is_none(),
            "the master key comes from COURIER_MASTER_KEY: roll it out in two steps: first add the new key to \
             COURIER_PREVIOUS_MASTER_KEYS on every instance (so each can unwrap what it wraps), then make it \
             COURIER_MASTER_KEY with the old key in COURIER_PREVIOUS_MASTER_KEYS; each instance re-wraps the \
             data keys in the background, and `courier keys status` says when the old key can go"
        );
    }
    let store = open_store(&settings)?;
    match cmd {
        KeysCommand::Status => print_key_status(&store)?,
        KeysCommand::Rotate { master } => {
            if master {
                let file = settings.key_file();
                let mut lines = courier::store::crypto::key_file_lines(&file)?;
                let new = courier::store::crypto::new_key_base64();
                lines.insert(0, new.clone());
                courier::store::crypto::rewrite_key_file(&file, &lines)?;
                let key = courier::store::crypto::MasterKey::from_base64(&new)?;
                println!(
                    "new master key {} is current (key file {}); back it up",
                    key.id,
                    file.display()
                );
                store.keys.promote(key);
            }
            let retired = store.retire_data_keys()?;
            println!("retired {retired} data keys: new writes get new ones");
            let n = store.rewrap_all()?;
            println!(
                "re-wrapped {n} data keys under master key {}",
                store.keys.master_key_id()
            );
            print_key_status(&store)?;
        }
        KeysCommand::ForgetPrevious => {
            let status = store.key_status()?;
            anyhow::ensure!(status.pending.is_empty(), "data keys still need previous master key(s) {:?}: wait for the re-wrap (`courier keys status`)", status.pending);
            let file = settings.key_file();
            let lines = courier::store::crypto::key_file_lines(&file)?;
            courier::store::crypto::rewrite_key_file(&file, &lines[..1])?;
            println!(
                "removed {} previous master key(s) from {}",
                lines.len() - 1,
                file.display()
            );
        }
    }
    Ok(())
}

fn outbox_status(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    let rows = courier::smart::outbox::status(&store)?;
    if rows.is_empty() {
        println!("the outbox is empty");
    }
    for r in rows {
        let oldest = r
            .oldest_pending
            .map_or("-".to_string(), courier::search::dates::format_instant);
        println!(
            "{}\tpending {}\tdelivered {}\toldest undelivered {}\t{}",
            r.ehr,
            r.pending,
            r.delivered,
            oldest,
            r.last_error.unwrap_or_default()
        );
    }
    Ok(())
}

fn identity_conflicts(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    for c in identity::conflicts(&store)? {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            courier::search::dates::format_instant(c.at),
            c.iss,
            c.ehr_ref,
            c.claimed,
            c.reason
        );
    }
    Ok(())
}

fn signing_key(settings: &Settings, cmd: SigningKeyCommand) -> anyhow::Result<()> {
    let tokens = Tokens::open(open_store(&settings)?, &settings.base_url)?;
    if let SigningKeyCommand::Rotate = cmd {
        println!("now signing with {}", tokens.rotate()?);
    }
    for k in tokens.jwks().keys {
        println!("{}", k.common.key_id.unwrap_or_default());
    }
    Ok(())
}

fn token(
    settings: &Settings,
    client_id: String,
    scope: String,
    fhir_user: Option<String>,
    patient: Option<String>,
) -> anyhow::Result<()> {
    let store = open_store(&settings)?;
    let client = clients::get(&store, &client_id)?
        .ok_or_else(|| anyhow::anyhow!("no client {client_id}"))?;
    let requested = scopes::parse_all(&scope).map_err(|e| anyhow::anyhow!(e))?;
    let granted = scopes::grant(&requested, &clients::registered_scopes(&client));
    anyhow::ensure!(
        !granted.is_empty(),
        "none of these scopes is registered for the client"
    );
    let tokens = Tokens::open(store, &settings.base_url)?;
    let issued = tokens.issue(&Grant {
        client_id,
        scopes: granted,
        fhir_user,
        patient,
        encounter: None,
    })?;
    println!("{}", issued.access_token);
    Ok(())
}

fn config(settings: &Settings) -> anyhow::Result<()> {
    let mut shown = settings.clone();
    // A PostgreSQL URL may carry a password: show the user, hide the password.
    if let (Some(scheme_end), Some(at)) = (
        shown.database_url.find("://"),
        shown.database_url.rfind('@'),
    ) {
        let userinfo = &shown.database_url[scheme_end + 3..at];
        if let Some((user, _)) = userinfo.split_once(':') {
            shown.database_url = format!(
                "{}{user}:***{}",
                &shown.database_url[..scheme_end + 3],
                &shown.database_url[at..]
            );
        }
    }
    println!("{shown:#?}");
    Ok(())
}

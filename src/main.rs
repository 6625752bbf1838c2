//! The `courier` command: configuration and telemetry, then the chosen subcommand.

use clap::{Parser, Subcommand};
use courier::auth::tokens::{Grant, Tokens};
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::smart::{identity, registry};
use courier::startup::{open_store, Application};
use std::path::PathBuf;
use std::sync::Arc;

/// Courier: FHIR R4 secure-messaging server.
///
/// Settings come from built-in defaults, then the optional TOML config file, then the environment:
/// COURIER_LISTEN (default 127.0.0.1:8080), COURIER_BASE_URL (public base URL), COURIER_DATA_DIR
/// (default ./data), COURIER_DATABASE_URL (default SQLite in the data dir; postgres://… selects
/// PostgreSQL), COURIER_MASTER_KEY (base64 of 32 bytes) or COURIER_MASTER_KEY_FILE (default
/// {data dir}/master.key, created with mode 0600 on first start), COURIER_MAX_RESOURCE_BYTES,
/// COURIER_MAX_BINARY_BYTES (default 10 MB), COURIER_DEFAULT_COUNT, COURIER_MAX_COUNT,
/// COURIER_DB_POOL_SIZE, COURIER_SQLITE_SYNCHRONOUS (FULL|NORMAL), COURIER_WORKERS, COURIER_LOG,
/// COURIER_IDLE_TIMEOUT_SECS (automatic log-off of signed-in users, default 900).
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
    },
    /// List the registered EHRs.
    List,
    /// Remove an EHR (its launches are refused from then on).
    Remove { name: String },
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
        Command::Serve => {
            actix_web::rt::System::new().block_on(async {
                let app = Application::build(settings.clone())?;
                tracing::info!(listen = %settings.listen, base_url = %settings.base_url, database = %app.store.db.backend_name(), "Courier is serving FHIR R4");
                app.run_until_stopped().await?;
                anyhow::Ok(())
            })
        }
        Command::Migrate => {
            let store = open_store(&settings)?;
            tracing::info!(database = %store.db.backend_name(), "migrations applied");
            Ok(())
        }
        Command::Client(cmd) => {
            let store = open_store(&settings)?;
            match cmd {
                ClientCommand::Add { name, jwks_url, jwks_file, scope } => {
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
        Command::Ehr(cmd) => {
            let store = open_store(&settings)?;
            match cmd {
                EhrCommand::Add { name, iss, client_id, alg, launch_scope, backend_scope, trusted_systems } => {
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
                        },
                    )?;
                    println!("{}\t{}\t{}/smart/jwks", ehr.name, ehr.kid, settings.base_url);
                }
                EhrCommand::List => {
                    for e in registry::list(&store)? {
                        println!("{}\t{}\t{}\t{}\t{}", e.name, e.iss, e.client_id, e.alg, e.kid);
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
        Command::Audit(AuditCommand::Verify) => {
            let store = open_store(&settings)?;
            match courier::audit::chain::verify(&store)? {
                courier::audit::chain::Verdict::Intact { links, unsealed } => {
                    println!("the audit chain is intact: {links} links ({unsealed} recent AuditEvents not sealed yet)");
                    Ok(())
                }
                courier::audit::chain::Verdict::Broken { seq, audit_id, why } => {
                    println!("BROKEN at link {seq} (AuditEvent/{audit_id}): {why}");
                    std::process::exit(1);
                }
            }
        }
        Command::Export { patient } => {
            anyhow::ensure!(fhir_codec::is_valid_id(&patient), "not a valid Patient id: {patient}");
            let store = open_store(&settings)?;
            let bundle = courier::messaging::export::everything(&store, &patient)?;
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
        Command::Outbox(OutboxCommand::Status) => {
            let store = open_store(&settings)?;
            let rows = courier::smart::outbox::status(&store)?;
            if rows.is_empty() {
                println!("the outbox is empty");
            }
            for r in rows {
                let oldest = r.oldest_pending.map_or("-".to_string(), courier::search::dates::format_instant);
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
        Command::Identity(IdentityCommand::Conflicts) => {
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
        Command::SigningKey(cmd) => {
            let tokens = Tokens::open(Arc::new(open_store(&settings)?), &settings.base_url)?;
            if let SigningKeyCommand::Rotate = cmd {
                println!("now signing with {}", tokens.rotate()?);
            }
            for k in tokens.jwks().keys {
                println!("{}", k.common.key_id.unwrap_or_default());
            }
            Ok(())
        }
        Command::Token { client_id, scope, fhir_user, patient } => {
            let store = Arc::new(open_store(&settings)?);
            let client = clients::get(&store, &client_id)?
                .ok_or_else(|| anyhow::anyhow!("no client {client_id}"))?;
            let requested = scopes::parse_all(&scope).map_err(|e| anyhow::anyhow!(e))?;
            let granted = scopes::grant(&requested, &clients::registered_scopes(&client));
            anyhow::ensure!(!granted.is_empty(), "none of these scopes is registered for the client");
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
        Command::Config => {
            let mut shown = settings.clone();
            // A PostgreSQL URL may carry a password: show the user, hide the password.
            if let (Some(scheme_end), Some(at)) = (shown.database_url.find("://"), shown.database_url.rfind('@')) {
                let userinfo = &shown.database_url[scheme_end + 3..at];
                if let Some((user, _)) = userinfo.split_once(':') {
                    shown.database_url = format!("{}{user}:***{}", &shown.database_url[..scheme_end + 3], &shown.database_url[at..]);
                }
            }
            println!("{shown:#?}");
            Ok(())
        }
    }
}

//! The `courier` command: configuration and telemetry, then the chosen subcommand.

use clap::{Parser, Subcommand};
use courier::config::Settings;
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
/// COURIER_DB_POOL_SIZE, COURIER_SQLITE_SYNCHRONOUS (FULL|NORMAL), COURIER_WORKERS, COURIER_LOG.
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

//! The `warden` command line.

use clap::{Parser, Subcommand};

use crate::configuration::Settings;
use crate::inventory::{self, StateFilter};
use crate::startup::Application;
use crate::store::sealing::{self, Sealer};
use crate::upm::{self, SiteCredentials, SiteUrl, UpmClient};
use connect_protocol::domain::BaseUrl;
use connect_protocol::qsh::CanonicalRequest;
use secrecy::SecretString;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "Backend of an Atlassian Connect app: install lifecycle, per-installation secrets, request authentication",
    long_about = "Backend of an Atlassian Connect app. It receives the install lifecycle of every Jira/Confluence \
site that installs the app, verifies each callback (Atlassian's RS256 signed installs, HS256 tenant tokens), keeps one \
shared secret per installation with its history, and authenticates the requests the sites send.\n\n\
Settings come from an optional TOML file named by WARDEN_CONFIG, overridden by WARDEN_* environment variables \
(WARDEN_BIND, WARDEN_BASE_URL, WARDEN_REDIS_URL, WARDEN_DATA_DIR, WARDEN_SECRET_KEYS, ...; see README.md). Without WARDEN_REDIS_URL the \
embedded store under WARDEN_DATA_DIR is used. Log level: RUST_LOG (default info); WARDEN_LOG_FORMAT=json for JSON lines."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the HTTP service (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Debugging aids for Connect JWTs ("query hash does not match" and friends).
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Shared secrets at rest (WARDEN_SECRET_KEYS).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// The installations in the store, for operators: list, show one, count.
    #[command(subcommand, long_about = TENANTS_ABOUT)]
    Tenants(TenantsCommand),
    /// Install the app on a development site (or remove it) through the site's plugin manager.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Moving to Forge: what Forge's manifest needs to call this service.
    #[command(subcommand)]
    Forge(ForgeCommand),
}

#[derive(Debug, Subcommand)]
pub enum ForgeCommand {
    /// Print the Forge manifest fragment (YAML) that points Forge at this service, to merge
    /// into manifest.yml.
    ///
    /// From the settings the descriptor is rendered from: a remote `warden` whose baseUrl is
    /// WARDEN_BASE_URL, asking Forge for the app system token (x-forge-oauth-system);
    /// app.connect.key = WARDEN_APP_KEY with that remote; app.id = WARDEN_FORGE_APP_ID (a
    /// comment when unset); and a trigger sending avi:forge:installed:app and
    /// avi:forge:upgraded:app to POST /forge/events through the endpoint
    /// `warden-forge-events`. Reads no store and writes nothing.
    Manifest,
}

const TENANTS_ABOUT: &str = "The installations in the store, for operators: list them, show one, count them. \
Reads the store configured for `serve` (same settings: WARDEN_REDIS_URL, WARDEN_REDIS_CLUSTER, WARDEN_REDIS_PREFIX, \
WARDEN_DATA_DIR, WARDEN_SECRET_KEYS to open sealed secrets) and never writes. On Redis it may run beside the service; \
with the embedded store, stop the service first: its database file admits one process at a time. \
No shared secret is ever printed, only its fingerprint: the first 12 hex digits of its SHA-256 \
(`printf %s \"$secret\" | sha256sum | cut -c1-12`), which gives nothing back of the secret.";

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// One line per installation: clientKey, baseUrl, state, product, installed and updated
    /// times (UTC), tab-separated under a header line; printed as the store is read, page by
    /// page (Redis: SCAN, every primary of a Cluster; embedded: the table in clientKey
    /// order). On Redis an installation may be listed twice if the server resizes its key
    /// table meanwhile. Records that cannot be read are named on stderr.
    List {
        /// Only installations in this state (superseded: replaced by a site import).
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Only installations whose baseUrl matches this glob (`*` any text, `/` included;
        /// `?` one character; `[abc]` one of), e.g. 'https://*.atlassian.net/wiki'.
        #[arg(long, value_name = "GLOB")]
        site: Option<String>,
        /// One JSON object per line (clientKey, baseUrl, state, productType, installedAt,
        /// updatedAt in Unix seconds).
        #[arg(long)]
        json: bool,
    },
    /// Everything known of one installation: attributes, state, what it supersedes or is
    /// superseded by, site proof, times, and its secret history as fingerprints. ID is tried
    /// as a clientKey, then as a baseUrl (every installation ever on that site), then as a
    /// cloudId or installationId (these scan the whole store). Exit code 1 when nothing
    /// matches; every match is shown when several do.
    Show {
        /// A clientKey, baseUrl, cloudId or installationId.
        id: String,
        /// A JSON array of the matching installations.
        #[arg(long)]
        json: bool,
    },
    /// Counts over the whole store: installations by state and product, sites, records with
    /// sealed or plaintext secrets, unreadable records, secret history lengths, site proofs.
    Stats {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The site and the administrator `warden dev` acts as. The API token is read from the
/// environment variable ATLASSIAN_API_TOKEN only, never from the command line.
#[derive(Debug, clap::Args)]
pub struct SiteArgs {
    /// The site's base URL, e.g. https://NAME.atlassian.net (Confluence:
    /// https://NAME.atlassian.net/wiki). HTTPS only (plain HTTP for 127.0.0.1/localhost).
    #[arg(long, value_name = "URL")]
    pub site: String,
    /// Atlassian account email of a site administrator; its API token (from
    /// https://id.atlassian.com/manage-profile/security/api-tokens) goes in ATLASSIAN_API_TOKEN.
    #[arg(long, value_name = "EMAIL")]
    pub user: String,
    /// Timeout of each request to the site, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Install the app on a development site from its descriptor URL, as "Upload app" does.
    ///
    /// Asks the site's plugin manager (UPM REST API, /rest/plugins/1.0/) to install the app from
    /// the descriptor URL, then waits until UPM reports the outcome and prints UPM's error text if
    /// it failed (exit code 1). The site fetches the descriptor and sends the signed `installed`
    /// callback itself, so both must be reachable from the internet (e.g. through a tunnel
    /// named by WARDEN_BASE_URL) and warden must be running. The account must be a site
    /// administrator and the site must have development mode on (Settings > Apps > Manage apps >
    /// Settings > Enable development mode). Same settings as `serve` (WARDEN_BASE_URL,
    /// WARDEN_APP_KEY, ...).
    Register {
        #[command(flatten)]
        site: SiteArgs,
        /// The descriptor URL UPM installs from. Default: WARDEN_BASE_URL + /atlassian-connect.json.
        #[arg(long, value_name = "URL")]
        descriptor_url: Option<String>,
        /// How long to wait for UPM to finish the install, in seconds.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait: u64,
    },
    /// Remove the app (WARDEN_APP_KEY) from a development site; the site sends `uninstalled`.
    Unregister {
        #[command(flatten)]
        site: SiteArgs,
    },
}

#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Refuse to start unless WARDEN_SECRET_KEYS is set (as WARDEN_REQUIRE_ENCRYPTION=true).
    #[arg(long)]
    pub require_encryption: bool,
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Seal every installation's secrets under the first key of WARDEN_SECRET_KEYS: plaintext
    /// ones and those sealed under older keys (same settings as `serve`). With the embedded
    /// store, stop the service first: its database file admits one process at a time.
    Rekey,
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Print the canonical request and its qsh for METHOD and URL.
    Canonical {
        /// HTTP method, e.g. GET.
        method: String,
        /// Full URL or path with query, e.g. "https://app.example.com/api/x?b=2&a=1".
        url: String,
        /// Base URL the path is relative to (the app's for requests to it, the site's for
        /// calls to the site, e.g. https://acme.atlassian.net/wiki).
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Print a token's header and claims. Nothing is verified.
    Decode {
        /// The token (with or without a leading "JWT ").
        token: String,
    },
}

/// Runs the command line; the `warden` binary's whole `main`.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args).await,
        Command::Secrets(SecretsCommand::Rekey) => rekey().await,
        Command::Tenants(command) => match tenants(command).await {
            // `warden tenants list | head`: the reader has all it wanted.
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
            {
                Ok(())
            }
            other => other,
        },
        Command::Dev(command) => dev(command).await,
        Command::Forge(ForgeCommand::Manifest) => {
            print!("{}", crate::forge::manifest::render(&Settings::load()?));
            Ok(())
        }
        Command::Jwt(JwtCommand::Canonical {
            method,
            url,
            base_url,
        }) => {
            let base_path = match base_url {
                Some(b) => BaseUrl::parse(&b)
                    .map_err(|e| anyhow::anyhow!("--base-url: {e}"))?
                    .path()
                    .to_owned(),
                None => String::new(),
            };
            let canonical = CanonicalRequest::from_url(&method, &url, &base_path);
            println!("canonical request: {}", canonical.as_str());
            println!("qsh:               {}", canonical.qsh());
            Ok(())
        }
        Command::Jwt(JwtCommand::Decode { token }) => {
            println!("{}", decode_report(&token)?);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init("info");
    let mut settings = Settings::load()?;
    settings.require_encryption |= args.require_encryption;
    let store = if settings.redis_url.is_some() && settings.redis_cluster {
        "redis cluster".to_owned()
    } else if settings.redis_url.is_some() {
        "redis".to_owned()
    } else {
        format!("embedded ({})", settings.data_dir.display())
    };
    let app = Application::build(settings.clone()).await?;
    tracing::info!(
        port = app.port(),
        base_url = %settings.base_url,
        app_key = %settings.app_key,
        store = %store,
        install_auth = ?settings.install_auth,
        "warden listening"
    );
    app.run_until_stopped().await?;
    Ok(())
}

/// `warden secrets rekey`: prints what it did; fails when a record could not be sealed.
async fn rekey() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    if settings.secret_keys.is_empty() {
        anyhow::bail!(
            "WARDEN_SECRET_KEYS is not set: there is no key to seal the shared secrets with"
        );
    }
    let sealer = Sealer::new(settings.secret_keys.clone());
    let key_id = sealer
        .sealing_key()
        .map(ToString::to_string)
        .unwrap_or_default();
    let store = crate::startup::open_store(&settings, sealer.clone()).await?;
    let report = sealing::rekey(store.as_ref(), &sealer)
        .await
        .map_err(|e| anyhow::anyhow!("{}", crate::error::error_chain(&e)))?;
    println!("sealing every shared secret under key {key_id:?}");
    println!("plaintext records sealed: {}", report.sealed_plaintext);
    println!("records sealed again from older keys: {}", report.resealed);
    println!("records already under {key_id:?}: {}", report.unchanged);
    println!("records that failed: {}", report.failed.len());
    for (client_key, why) in &report.failed {
        eprintln!("{client_key}: {why}");
    }
    if !report.failed.is_empty() {
        anyhow::bail!(
            "{} installation(s) could not be sealed under key {key_id:?}",
            report.failed.len()
        );
    }
    Ok(())
}

/// `warden tenants ...`: reads the store `serve` would use; fails (exit code 1) when the store
/// cannot be read or `show` finds nothing.
async fn tenants(command: TenantsCommand) -> anyhow::Result<()> {
    use std::io::Write as _;
    let settings = Settings::load()?;
    if settings.redis_url.is_none() {
        // Opening would create an empty database: a mistyped WARDEN_DATA_DIR must not look
        // like an empty store.
        let file = settings.data_dir.join(crate::store::embedded::FILE_NAME);
        if !file.is_file() {
            anyhow::bail!(
                "there is no embedded store at {} (WARDEN_DATA_DIR)",
                file.display()
            );
        }
    }
    let store =
        crate::startup::open_store(&settings, Sealer::new(settings.secret_keys.clone())).await?;
    let store = store.as_ref();
    let failed = |e: inventory::InventoryError| match e {
        inventory::InventoryError::Store(e) => anyhow::anyhow!("{}", crate::error::error_chain(&e)),
        inventory::InventoryError::Output(e) => anyhow::Error::from(e),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match command {
        TenantsCommand::List { state, site, json } => {
            let site = site
                .map(|glob| {
                    glob::Pattern::new(&glob).map_err(|e| anyhow::anyhow!("--site {glob:?}: {e}"))
                })
                .transpose()?;
            let filter = inventory::ListFilter { state, site };
            inventory::list(store, &filter, json, &mut out, &mut std::io::stderr())
                .await
                .map_err(failed)?;
        }
        TenantsCommand::Show { id, json } => {
            let found = inventory::find(store, &id).await.map_err(failed)?;
            if found.is_empty() {
                anyhow::bail!(
                    "no installation has the clientKey, baseUrl, cloudId or installationId {id:?}"
                );
            }
            if json {
                let all: Vec<_> = found
                    .iter()
                    .map(|(by, installation)| {
                        let mut shown = inventory::show_json(installation);
                        shown["matchedBy"] = by.as_str().into();
                        shown
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
            } else {
                if found.len() > 1 {
                    writeln!(out, "{} installations match {id:?}", found.len())?;
                }
                for (i, (by, installation)) in found.iter().enumerate() {
                    if i > 0 {
                        writeln!(out)?;
                    }
                    writeln!(out, "matched by:       {}", by.as_str())?;
                    inventory::show_text(installation, &mut out)?;
                }
            }
        }
        TenantsCommand::Stats { json } => {
            let stats = inventory::stats(store).await.map_err(failed)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
            } else {
                inventory::stats_text(&stats, &mut out)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// The environment variable holding the administrator's API token.
pub const API_TOKEN_VAR: &str = "ATLASSIAN_API_TOKEN";

fn upm_client(args: &SiteArgs) -> anyhow::Result<UpmClient> {
    let site = SiteUrl::parse(&args.site)?;
    let token = std::env::var(API_TOKEN_VAR).map_err(|_| {
        anyhow::anyhow!(
            "{API_TOKEN_VAR} is not set: set it to an API token of {} \
             (https://id.atlassian.com/manage-profile/security/api-tokens)",
            args.user
        )
    })?;
    let credentials = SiteCredentials::new(&args.user, SecretString::from(token))?;
    Ok(UpmClient::new(
        site,
        credentials,
        Duration::from_secs(args.timeout.max(1)),
    )?)
}

/// `warden dev register` / `unregister`: prints what happened; fails with the site's reason.
async fn dev(command: DevCommand) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    match command {
        DevCommand::Register {
            site,
            descriptor_url,
            wait,
        } => {
            let client = upm_client(&site)?;
            let descriptor = match descriptor_url {
                Some(url) => upm::descriptor_url(&url)?,
                None => upm::descriptor_url(&settings.base_url.join("/atlassian-connect.json"))?,
            };
            if upm::unreachable_from(client.site(), &descriptor) {
                eprintln!(
                    "warning: the site fetches {descriptor} itself, from Atlassian's network: a \
                     local address is unreachable from there (expose warden through a tunnel and \
                     set WARDEN_BASE_URL to its https URL)"
                );
            }
            println!(
                "installing {} on {} from {descriptor}",
                settings.app_key,
                client.site().as_str()
            );
            let installed = client
                .install(&descriptor, &settings.app_key, Duration::from_secs(wait))
                .await?;
            let key = installed.key.as_deref().unwrap_or(&settings.app_key);
            println!("installed {key} on {}", client.site().as_str());
            if !installed.enabled {
                println!("note: the site keeps {key} disabled (it was disabled before); enable it on the Manage apps page");
            }
            Ok(())
        }
        DevCommand::Unregister { site } => {
            let client = upm_client(&site)?;
            client.uninstall(&settings.app_key).await?;
            println!(
                "removed {} from {}",
                settings.app_key,
                client.site().as_str()
            );
            Ok(())
        }
    }
}

/// Header and claims of a token, pretty-printed and marked unverified.
pub fn decode_report(token: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let token = token.trim().trim_start_matches("JWT ").trim();
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        anyhow::bail!(
            "a JWT has three dot-separated parts; this has {}",
            parts.len()
        );
    }
    let decode = |part: &str, what: &str| -> anyhow::Result<serde_json::Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|e| anyhow::anyhow!("the {what} is not base64url: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("the {what} is not JSON: {e}"))
    };
    let header = decode(parts[0], "header")?;
    let claims = decode(parts[1], "claims")?;
    let now = connect_protocol::jwt::now();
    let mut notes = Vec::new();
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_i64()) {
        notes.push(if exp < now {
            format!("exp is {}s in the past", now - exp)
        } else {
            format!("exp is in {}s", exp - now)
        });
    }
    if let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) {
        notes.push(format!("iat was {}s ago", now - iat));
    }
    Ok(format!(
        "UNVERIFIED: the signature was not checked\nheader: {}\nclaims: {}\n{}",
        serde_json::to_string_pretty(&header)?,
        serde_json::to_string_pretty(&claims)?,
        notes.join("\n")
    ))
}

//! The `devtenant` command line: plays Atlassian against a Connect app on this machine.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use super::client::{http_client, AppCaller, AppDescriptor, DescriptorOptions, Exchange};
use super::keys::{KeyRing, INDEX_FILE};
use super::rehearse::{self, DEFAULT_ACCOUNT_ID};
use super::server::DevServer;
use super::state::{
    fingerprint, new_secret, ServerInfo, StateDir, Tenant, DEFAULT_STATE_DIR, TENANTS_FILE,
};
use connect_protocol::jwt;
use connect_protocol::lifecycle::LifecycleEvent;

/// The descriptor URL when neither `--descriptor` nor the tenant's record names one.
pub const DEFAULT_DESCRIPTOR: &str = "http://127.0.0.1:8080/atlassian-connect.json";

const AFTER_HELP: &str = "\
Typical session (two terminals):

  # terminal 1: the install-key server and the fake Atlassian host
  devtenant serve --listen 127.0.0.1:8090

  # the app must fetch install keys from it and accept sites on 127.0.0.1:
  WARDEN_KEYS_URL=http://127.0.0.1:8090 WARDEN_PRODUCT_HOSTS=127.0.0.1 \\
  WARDEN_OAUTH_TOKEN_URL=http://127.0.0.1:8090/oauth2/token warden

  # terminal 2: one site's life
  devtenant install --descriptor http://127.0.0.1:8080/atlassian-connect.json --tenant acme
  devtenant request GET /api/tenant --tenant acme
  devtenant roll --tenant acme
  devtenant disable --tenant acme && devtenant enable --tenant acme
  devtenant import --tenant acme --as acme2
  devtenant uninstall --tenant acme2

  # or the whole catalogue, with its own key server, as a PASS/FAIL table:
  devtenant rehearse --descriptor http://127.0.0.1:8080/atlassian-connect.json --keys-listen 127.0.0.1:8090

Keys, tenants and the server address live in the state directory (--state-dir, default
./.devtenant): every subcommand run with the same directory signs with the keys `serve` serves.
Secrets are never printed in full: a fingerprint shows their first 4 characters and length.
Only loopback apps are talked to unless --allow-remote is given.";

#[derive(Debug, Parser)]
#[command(
    name = "devtenant",
    version,
    about = "Play Atlassian against a Connect app on this machine: install keys, fake sites, signed lifecycle callbacks and product requests",
    long_about = "Play the Atlassian side of the Connect install lifecycle against an app running on this machine, over \
real HTTP on 127.0.0.1: an install-key server with RSA keys it keeps in a state directory, fake host sites (with the \
REST and OAuth2 endpoints an app calls back), RS256-signed lifecycle callbacks, HS256 product requests, and a rehearsal \
of the whole catalogue (including forged callbacks that must be refused).",
    after_help = AFTER_HELP
)]
pub struct DevtenantCli {
    /// State directory: install keys, tenants (tenants.json), the server address (server.json).
    /// `rehearse` keeps its keys in memory unless this is given.
    #[arg(long, global = true, env = "DEVTENANT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: DevtenantCommand,
}

/// Which app, and where it is reached.
#[derive(Debug, Clone, Args)]
pub struct AppArgs {
    /// URL of the app's descriptor; it names the app key, the base URL (the `aud` of install
    /// tokens) and the lifecycle paths. Default: the one the tenant was installed from, else
    /// http://127.0.0.1:8080/atlassian-connect.json.
    #[arg(long, env = "DEVTENANT_DESCRIPTOR", value_name = "URL")]
    pub descriptor: Option<String>,
    /// Send requests here instead of the descriptor's baseUrl (the aud stays the baseUrl). By
    /// default a non-loopback baseUrl is reached where the descriptor was read.
    #[arg(long, value_name = "URL")]
    pub app_url: Option<String>,
    /// Allow a descriptor or app URL that is not on a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Timeout of one request, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum DevtenantCommand {
    /// Run the install-key server and the fake host on one loopback address until Ctrl-C.
    ///
    /// Keys are served at `/<kid>` (so the server URL is the app's WARDEN_KEYS_URL), sites live
    /// under `/t/<siteKey>`, the OAuth2 token endpoint is `/oauth2/token`. The address is
    /// written to the state directory; keys and tenants changed by other subcommands are picked
    /// up while running.
    Serve {
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:8090", value_name = "ADDR")]
        listen: String,
        /// Also serve a site with a plugin manager (UPM) whose administrator is EMAIL, with the
        /// API token in DEVTENANT_UPM_TOKEN: `warden dev register --site <its URL> --user EMAIL`
        /// installs an app on it. Its installations live in memory only.
        #[arg(long, value_name = "EMAIL")]
        upm_user: Option<String>,
        /// Name of that site (its URL is <server>/t/NAME).
        #[arg(long, default_value = "dev", value_name = "NAME")]
        upm_site: String,
    },
    /// Install the app on a site: a new one (random clientKey, secret, oauthClientId), or
    /// again on an existing one with a new secret (like `roll`).
    Install {
        #[command(flatten)]
        app: AppArgs,
        /// Local name of the site; generated when omitted.
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
        /// Legacy protocol: a new site's install is unsigned; a reinstall is HS256-signed with
        /// the previous secret.
        #[arg(long)]
        legacy: bool,
    },
    /// Send `uninstalled` (RS256 signed; --legacy: HS256 with the current secret).
    Uninstall {
        #[command(flatten)]
        app: AppArgs,
        #[arg(long, value_name = "NAME")]
        tenant: String,
        #[arg(long)]
        legacy: bool,
    },
    /// Send `enabled` (HS256 with the site's secret).
    Enable {
        #[command(flatten)]
        app: AppArgs,
        #[arg(long, value_name = "NAME")]
        tenant: String,
    },
    /// Send `disabled` (HS256 with the site's secret).
    Disable {
        #[command(flatten)]
        app: AppArgs,
        #[arg(long, value_name = "NAME")]
        tenant: String,
    },
    /// Roll the site's secret: `installed` again carrying a new one (RS256 signed; --legacy:
    /// HS256 signed with the previous secret).
    Roll {
        #[command(flatten)]
        app: AppArgs,
        #[arg(long, value_name = "NAME")]
        tenant: String,
        #[arg(long)]
        legacy: bool,
    },
    /// Site import: install a new clientKey and oauthClientId on the same baseUrl,
    /// without an uninstall for the old one.
    Import {
        #[command(flatten)]
        app: AppArgs,
        /// The site that is imported.
        #[arg(long, value_name = "NAME")]
        tenant: String,
        /// Name of the new site; generated when omitted.
        #[arg(long = "as", value_name = "NEW_NAME")]
        new_name: Option<String>,
    },
    /// Send a product request as a site and user: HS256 JWT with the site's secret and the
    /// qsh of METHOD and PATH (relative to the app's base URL, query included).
    Request {
        #[command(flatten)]
        app: AppArgs,
        /// HTTP method, e.g. GET.
        method: String,
        /// Path relative to the app's base URL, with an optional query, e.g. "/api/tenant?x=1".
        path: String,
        #[arg(long, value_name = "NAME")]
        tenant: String,
        /// Account id of the user (`sub`).
        #[arg(long, default_value = DEFAULT_ACCOUNT_ID, value_name = "ACCOUNT_ID")]
        user: String,
        /// Sign with the site's previous secret (to see it refused after a roll).
        #[arg(long)]
        previous_secret: bool,
        /// Shift `iat` by this many seconds (negative: in the past).
        #[arg(
            long,
            default_value_t = 0,
            allow_hyphen_values = true,
            value_name = "SECONDS"
        )]
        iat_offset: i64,
        /// JSON request body.
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
        /// Send it as a webhook delivery with `X-Atlassian-Webhook-Identifier: ID` (method
        /// POST); the same ID again is a retry of that delivery.
        #[arg(long, value_name = "ID")]
        webhook_id: Option<String>,
    },
    /// Make a new install-signing key current (the old kids stay served).
    RotateKey,
    /// List the sites in the state directory.
    Tenants,
    /// Run the whole catalogue against an app and print a PASS/FAIL table; exits 1 on any
    /// failure.
    ///
    /// Starts its own install-key server and fake host: the app must already use it as
    /// WARDEN_KEYS_URL (pass --keys-listen 127.0.0.1:PORT and start the app with
    /// WARDEN_KEYS_URL=http://127.0.0.1:PORT) and allow the product host 127.0.0.1
    /// (WARDEN_PRODUCT_HOSTS=127.0.0.1).
    Rehearse {
        #[command(flatten)]
        app: AppArgs,
        /// The app runs in legacy mode: rehearse the secret migration (unsigned install, ignored
        /// uninstall, reinstall HS256 with the old secret) instead of refusing unsigned installs.
        #[arg(long)]
        legacy: bool,
        /// Require warden's exact statuses (by default the class, 2xx or 4xx, must match).
        #[arg(long)]
        strict: bool,
        /// The app's grace window for the previous secret after a roll
        /// (WARDEN_SECRET_GRACE_SECONDS); the rehearsal waits it out.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        grace_seconds: u64,
        /// A route of the app that needs a product JWT and answers 200 to GET.
        #[arg(long, default_value = "/api/tenant", value_name = "PATH")]
        probe_path: String,
        /// Where the install-key server (and fake host) listen.
        #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
        keys_listen: String,
        /// How long to wait for the app's descriptor to answer.
        #[arg(long, default_value_t = 10, value_name = "SECONDS")]
        wait: u64,
        /// Print every request and answer.
        #[arg(long, short)]
        verbose: bool,
    },
}

/// The whole `main` of the `devtenant` binary.
pub async fn main() -> ExitCode {
    let cli = DevtenantCli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("devtenant: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one command; `Ok(1)` when the app refused or a check failed, `Err` when devtenant
/// itself could not do its part.
pub async fn run(cli: DevtenantCli) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(
        cli.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
    );
    match cli.command {
        DevtenantCommand::Serve {
            listen,
            upm_user,
            upm_site,
        } => {
            let upm = match upm_user {
                Some(user) => {
                    let token = std::env::var(UPM_TOKEN_VAR).map_err(|_| {
                        anyhow::anyhow!("--upm-user needs the site's API token in {UPM_TOKEN_VAR}")
                    })?;
                    Some((upm_site, user, token))
                }
                None => None,
            };
            serve(&state, &listen, upm).await
        }
        DevtenantCommand::Install {
            app,
            tenant,
            legacy,
        } => install(&state, &app, tenant.as_deref(), legacy, false).await,
        DevtenantCommand::Roll {
            app,
            tenant,
            legacy,
        } => install(&state, &app, Some(&tenant), legacy, true).await,
        DevtenantCommand::Uninstall {
            app,
            tenant,
            legacy,
        } => uninstall(&state, &app, &tenant, legacy).await,
        DevtenantCommand::Enable { app, tenant } => {
            enable_disable(&state, &app, &tenant, LifecycleEvent::Enabled).await
        }
        DevtenantCommand::Disable { app, tenant } => {
            enable_disable(&state, &app, &tenant, LifecycleEvent::Disabled).await
        }
        DevtenantCommand::Import {
            app,
            tenant,
            new_name,
        } => import(&state, &app, &tenant, new_name.as_deref()).await,
        DevtenantCommand::Request {
            app,
            method,
            path,
            tenant,
            user,
            previous_secret,
            iat_offset,
            data,
            webhook_id,
        } => {
            let signing = Signing {
                user: &user,
                previous_secret,
                iat_offset,
            };
            request(
                &state,
                &app,
                &tenant,
                &method,
                &path,
                signing,
                data,
                webhook_id.as_deref(),
            )
            .await
        }
        DevtenantCommand::RotateKey => rotate_key(&state).await,
        DevtenantCommand::Tenants => list_tenants(&state),
        DevtenantCommand::Rehearse {
            app,
            legacy,
            strict,
            grace_seconds,
            probe_path,
            keys_listen,
            wait,
            verbose,
        } => {
            let options = rehearse::Options {
                descriptor: app
                    .descriptor
                    .clone()
                    .unwrap_or_else(|| DEFAULT_DESCRIPTOR.to_owned()),
                allow_remote: app.allow_remote,
                app_url: app.app_url.clone(),
                legacy,
                strict,
                grace_seconds,
                probe_path,
                listen: keys_listen,
                state_dir: cli.state_dir,
                verbose,
                timeout: Duration::from_secs(app.timeout),
                wait: Duration::from_secs(wait),
                ..rehearse::Options::default()
            };
            rehearse_command(options).await
        }
    }
}

async fn rehearse_command(options: rehearse::Options) -> anyhow::Result<ExitCode> {
    let rehearsal = rehearse::Rehearsal::start(options.clone()).await?;
    println!(
        "devtenant rehearse: install-key server and fake host at {url}\n\
         (the app must run with WARDEN_KEYS_URL={url} and WARDEN_PRODUCT_HOSTS=127.0.0.1)\n\
         descriptor: {}\n",
        options.descriptor,
        url = rehearsal.keys_url(),
    );
    let report = rehearsal.run().await?;
    println!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

// ---- serve ----

/// The API token of `serve --upm-user`.
const UPM_TOKEN_VAR: &str = "DEVTENANT_UPM_TOKEN";

/// `upm`: a site with a plugin manager to serve, (name, administrator, API token).
async fn serve(
    state: &StateDir,
    listen: &str,
    upm: Option<(String, String, String)>,
) -> anyhow::Result<ExitCode> {
    init_logging();
    let dir = state.clone();
    let ring = tokio::task::spawn_blocking(move || dir.keyring()).await??;
    let ring = Arc::new(RwLock::new(ring));
    let server = DevServer::start(listen, ring.clone())
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    state.write_server_info(&ServerInfo {
        url: server.url(),
        keys_url: server.keys_url(),
        pid: std::process::id(),
    })?;
    let registered = register_tenants(state, &server);
    {
        let ring = ring.read().unwrap_or_else(PoisonError::into_inner);
        println!(
            "devtenant serving on {} (state directory {})",
            server.url(),
            state.path().display()
        );
        println!(
            "  install keys: {}/<kid>  ({} key(s), current kid {})",
            server.keys_url(),
            ring.keys().len(),
            ring.current().kid
        );
        println!(
            "  fake sites:   {}/t/<siteKey>  ({registered} site(s) known)",
            server.url()
        );
        println!("  OAuth2 token: {}", server.token_url());
        if let Some((site, user, token)) = &upm {
            let url = server.add_upm_site(site, user, token);
            println!("  UPM site:     {url}  (warden dev register --site {url} --user {user})");
        }
        println!();
        println!("Start the app with:");
        println!(
            "  WARDEN_KEYS_URL={} WARDEN_PRODUCT_HOSTS=127.0.0.1 WARDEN_OAUTH_TOKEN_URL={}",
            server.keys_url(),
            server.token_url()
        );
        println!("then, in another terminal (same --state-dir):");
        println!("  devtenant install --descriptor {DEFAULT_DESCRIPTOR} --tenant acme");
        println!("Ctrl-C stops.");
    }
    let keys_index = state.path().join(INDEX_FILE);
    let tenants_file = state.path().join(TENANTS_FILE);
    let (mut keys_seen, mut tenants_seen) = (modified(&keys_index), modified(&tenants_file));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let keys_now = modified(&keys_index);
                if keys_now != keys_seen {
                    keys_seen = keys_now;
                    match KeyRing::load_or_create(state.path()) {
                        Ok(loaded) => {
                            println!("keys changed on disk: now {} key(s), current kid {}", loaded.keys().len(), loaded.current().kid);
                            *ring.write().unwrap_or_else(PoisonError::into_inner) = loaded;
                        }
                        Err(e) => eprintln!("cannot reload the keys: {e}"),
                    }
                }
                let tenants_now = modified(&tenants_file);
                if tenants_now != tenants_seen {
                    tenants_seen = tenants_now;
                    let n = register_tenants(state, &server);
                    println!("tenants changed on disk: {n} site(s) known");
                }
            }
        }
    }
    println!("stopping");
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Tells the fake host every current site of the state directory; returns how many.
fn register_tenants(state: &StateDir, server: &DevServer) -> usize {
    let tenants = match state.load_tenants() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read the tenants: {e:#}");
            return 0;
        }
    };
    let mut registered = 0;
    for record in tenants
        .values()
        .filter(|t| t.imported_as.is_none())
        .filter_map(Tenant::host_record)
    {
        server.host().register_tenant(record);
        registered += 1;
    }
    registered
}

// ---- lifecycle subcommands ----

/// The app, from `--descriptor`, else the tenant's, else the default.
async fn connect(app: &AppArgs, tenant: Option<&Tenant>) -> anyhow::Result<AppCaller> {
    let url = app
        .descriptor
        .clone()
        .or_else(|| tenant.and_then(|t| t.descriptor_url.clone()))
        .unwrap_or_else(|| DEFAULT_DESCRIPTOR.to_owned());
    let http = http_client(Duration::from_secs(app.timeout.max(1)));
    let options = DescriptorOptions {
        allow_remote: app.allow_remote,
        app_url: app.app_url.clone(),
    };
    let descriptor = AppDescriptor::fetch(&http, &url, &options).await?;
    println!("{}", descriptor.summary());
    Ok(AppCaller::new(http, descriptor))
}

fn describe_tenant(t: &Tenant) -> String {
    let mut out = format!(
        "tenant {}: clientKey {}, baseUrl {}, oauthClientId {}, secret {}",
        t.name,
        t.client_key,
        t.base_url,
        t.oauth_client_id,
        fingerprint(&t.shared_secret)
    );
    if let Some(previous) = t.previous_secret() {
        out.push_str(&format!(" (previous {})", fingerprint(previous)));
    }
    out
}

fn exit_for(exchange: &Exchange) -> ExitCode {
    if exchange.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Where `serve` runs, for new sites' base URLs; checks that it serves the current key.
async fn server_url(state: &StateDir, client: &AppCaller, kid: &str) -> anyhow::Result<String> {
    let info = state.server_info()?.with_context(|| {
        format!(
            "no devtenant server has run with the state directory {}: start `devtenant serve` (same --state-dir) \
             first and start the app with WARDEN_KEYS_URL set to its address",
            state.path().display()
        )
    })?;
    let key_url = format!("{}/{kid}", info.keys_url);
    match client.http.get(&key_url).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => println!(
            "warning: the key server at {} answers {} for the current kid; is `devtenant serve` running with this --state-dir?",
            info.keys_url,
            r.status()
        ),
        Err(_) => println!(
            "warning: the key server at {} does not answer; start `devtenant serve` or the app cannot verify installs",
            info.keys_url
        ),
    }
    Ok(info.url)
}

fn current_key(state: &StateDir) -> anyhow::Result<super::keys::SigningKey> {
    Ok(state.keyring()?.current().clone())
}

/// `install` (new site or reinstall) and `roll` (`must_exist`).
async fn install(
    state: &StateDir,
    app: &AppArgs,
    name: Option<&str>,
    legacy: bool,
    must_exist: bool,
) -> anyhow::Result<ExitCode> {
    let existing = match name {
        Some(n) if must_exist => Some(state.tenant(n)?),
        Some(n) => state.load_tenants()?.get(n).cloned(),
        None => None,
    };
    let client = connect(app, existing.as_ref()).await?;
    let key = current_key(state)?;
    let (mut tenant, previous) = match existing {
        Some(mut tenant) => {
            let previous = tenant.shared_secret.clone();
            tenant.roll_to(new_secret());
            println!("rolling the secret of {}", describe_tenant(&tenant));
            (tenant, Some(previous))
        }
        None => {
            let host = server_url(state, &client, &key.kid).await?;
            let mut tenant = Tenant::generate(name, &host);
            tenant.descriptor_url = Some(client.app.url.clone());
            println!("new {}", describe_tenant(&tenant));
            (tenant, None)
        }
    };
    tenant.app_key = Some(client.app.key.clone());
    let token = match (&previous, legacy) {
        (None, true) => None,
        (Some(previous), true) => {
            Some(client.tenant_token(previous, &mut tenant, LifecycleEvent::Installed)?)
        }
        (_, false) => Some(client.install_token(&key, &mut tenant, LifecycleEvent::Installed)?),
    };
    let body = tenant.body(&client.app.key, "installed");
    let exchange = client
        .send_callback(LifecycleEvent::Installed, token.as_deref(), &body)
        .await?;
    println!("{exchange}");
    if exchange.is_success() {
        tenant.installed = true;
        tenant.enabled = true;
        state.put_tenant(&tenant)?;
        println!(
            "saved tenant {} (secret {})",
            tenant.name,
            fingerprint(&tenant.shared_secret)
        );
    } else if let Some(previous) = previous {
        // The app kept the old secret: so does the site. Keep the token counter.
        let last_exp = tenant.last_exp;
        let mut kept = tenant;
        kept.shared_secret = previous;
        kept.previous_secrets.pop();
        kept.last_exp = last_exp;
        state.put_tenant(&kept)?;
        println!(
            "the app refused: tenant {} keeps its secret {}",
            kept.name,
            fingerprint(&kept.shared_secret)
        );
    } else {
        println!("the app refused: tenant not saved");
    }
    Ok(exit_for(&exchange))
}

async fn uninstall(
    state: &StateDir,
    app: &AppArgs,
    name: &str,
    legacy: bool,
) -> anyhow::Result<ExitCode> {
    let event = LifecycleEvent::Uninstalled;
    tenant_callback(
        state,
        app,
        name,
        event,
        |client, tenant| {
            if legacy {
                let secret = tenant.shared_secret.clone();
                client.tenant_token(&secret, tenant, event)
            } else {
                client.install_token(&current_key(state)?, tenant, event)
            }
        },
        |tenant| tenant.installed = false,
    )
    .await
}

async fn enable_disable(
    state: &StateDir,
    app: &AppArgs,
    name: &str,
    event: LifecycleEvent,
) -> anyhow::Result<ExitCode> {
    let enabled = event == LifecycleEvent::Enabled;
    tenant_callback(
        state,
        app,
        name,
        event,
        |client, tenant| {
            let secret = tenant.shared_secret.clone();
            client.tenant_token(&secret, tenant, event)
        },
        |tenant| tenant.enabled = enabled,
    )
    .await
}

/// Sends `event` for the tenant `name`, signed with the token `sign` makes, and applies
/// `update` to the tenant when the app accepts it. When the descriptor declares no path for
/// `event`, a host sends nothing: `update` applies at once. The tenant is saved either way.
async fn tenant_callback(
    state: &StateDir,
    app: &AppArgs,
    name: &str,
    event: LifecycleEvent,
    sign: impl FnOnce(&AppCaller, &mut Tenant) -> anyhow::Result<String>,
    update: impl Fn(&mut Tenant),
) -> anyhow::Result<ExitCode> {
    let mut tenant = state.tenant(name)?;
    let client = connect(app, Some(&tenant)).await?;
    println!("{}", describe_tenant(&tenant));
    if client.app.lifecycle_path(event).is_none() {
        println!(
            "the descriptor declares no {} path: a host sends nothing",
            event.name()
        );
        update(&mut tenant);
        state.put_tenant(&tenant)?;
        return Ok(ExitCode::SUCCESS);
    }
    let token = sign(&client, &mut tenant)?;
    let body = tenant.body(&client.app.key, event.name());
    let exchange = client.send_callback(event, Some(&token), &body).await?;
    println!("{exchange}");
    if exchange.is_success() {
        update(&mut tenant);
    }
    state.put_tenant(&tenant)?;
    Ok(exit_for(&exchange))
}

async fn import(
    state: &StateDir,
    app: &AppArgs,
    name: &str,
    new_name: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut old = state.tenant(name)?;
    if let Some(new_name) = new_name {
        if state.load_tenants()?.contains_key(new_name) {
            bail!("a tenant named {new_name:?} exists already");
        }
    }
    let client = connect(app, Some(&old)).await?;
    let mut new = old.imported(new_name);
    new.app_key = Some(client.app.key.clone());
    println!("site import of {}", describe_tenant(&old));
    println!("new {}", describe_tenant(&new));
    let token = client.install_token(&current_key(state)?, &mut new, LifecycleEvent::Installed)?;
    let body = new.body(&client.app.key, "installed");
    let exchange = client
        .send_callback(LifecycleEvent::Installed, Some(&token), &body)
        .await?;
    println!("{exchange}");
    if exchange.is_success() {
        new.installed = true;
        old.imported_as = Some(new.name.clone());
        state.put_tenant(&old)?;
        state.put_tenant(&new)?;
        println!("saved tenant {}; {} is marked imported", new.name, old.name);
    }
    Ok(exit_for(&exchange))
}

#[allow(clippy::too_many_arguments)]
/// How `devtenant request` signs: as which user, with which secret, issued when.
struct Signing<'a> {
    user: &'a str,
    previous_secret: bool,
    iat_offset: i64,
}

#[allow(clippy::too_many_arguments)]
async fn request(
    state: &StateDir,
    app: &AppArgs,
    name: &str,
    method: &str,
    path: &str,
    signing: Signing<'_>,
    data: Option<String>,
    webhook_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let Signing {
        user,
        previous_secret,
        iat_offset,
    } = signing;
    if webhook_id.is_some() && !method.eq_ignore_ascii_case("POST") {
        anyhow::bail!("a webhook delivery (--webhook-id) is a POST, not {method}");
    }
    let tenant = state.tenant(name)?;
    let client = connect(app, Some(&tenant)).await?;
    println!("{}", describe_tenant(&tenant));
    let secret = if previous_secret {
        tenant
            .previous_secret()
            .with_context(|| format!("tenant {name} has no previous secret"))?
    } else {
        &tenant.shared_secret
    };
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let canonical = client.app.canonical(method, &path);
    println!(
        "canonical request {} (signed with {})",
        canonical.as_str(),
        fingerprint(secret)
    );
    let token = client.product_token(
        secret,
        &tenant.client_key,
        method,
        &path,
        user,
        jwt::now() + iat_offset,
    )?;
    let exchange = match webhook_id {
        Some(id) => client.webhook(&path, &token, id, data).await,
        None => client.product_request(method, &path, &token, data).await?,
    };
    println!("{exchange}");
    Ok(exit_for(&exchange))
}

async fn rotate_key(state: &StateDir) -> anyhow::Result<ExitCode> {
    let dir = state.clone();
    let (kid, count) = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, usize)> {
        let mut ring = dir.keyring()?;
        let kid = ring.rotate()?.kid.clone();
        Ok((kid, ring.keys().len()))
    })
    .await??;
    println!("new current kid {kid} ({count} keys; the older ones stay served)");
    if let Some(info) = state.server_info()? {
        println!(
            "a running `devtenant serve` at {} picks it up within a second",
            info.keys_url
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list_tenants(state: &StateDir) -> anyhow::Result<ExitCode> {
    let tenants = state.load_tenants()?;
    if tenants.is_empty() {
        println!("no tenants in {}", state.tenants_path().display());
    }
    for t in tenants.values() {
        let status = match (t.installed, t.enabled, &t.imported_as) {
            (_, _, Some(new)) => format!("imported as {new}"),
            (false, _, None) => "not installed".to_owned(),
            (true, false, None) => "installed, disabled".to_owned(),
            (true, true, None) => "installed".to_owned(),
        };
        println!("{} [{status}]", describe_tenant(t));
    }
    Ok(ExitCode::SUCCESS)
}

/// Log lines on stderr, `RUST_LOG` or `info`; colours only on a terminal.
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn command_line_is_consistent() {
        DevtenantCli::command().debug_assert();
    }

    #[test]
    fn request_parses_method_path_and_flags() {
        let cli = DevtenantCli::try_parse_from([
            "devtenant",
            "--state-dir",
            "/tmp/x",
            "request",
            "GET",
            "/api/tenant?a=1",
            "--tenant",
            "acme",
            "--iat-offset",
            "-30",
        ])
        .unwrap();
        assert_eq!(cli.state_dir.as_deref(), Some(Path::new("/tmp/x")));
        match cli.command {
            DevtenantCommand::Request {
                method,
                path,
                tenant,
                iat_offset,
                ..
            } => {
                assert_eq!(
                    (method.as_str(), path.as_str(), tenant.as_str(), iat_offset),
                    ("GET", "/api/tenant?a=1", "acme", -30)
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

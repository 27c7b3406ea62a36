//! `devtenant rehearse`: the whole install-lifecycle catalogue against a running app, as a
//! table of scenario, check, expected, observed and verdict.
//!
//! The rehearsal plays Atlassian: it runs its own install-key server and fake host
//! ([`DevServer`]) on a loopback address, gives every site it invents a `baseUrl` on that host,
//! and sends the app signed (and forged) lifecycle callbacks and product requests. The app under
//! test must fetch install keys from the rehearsal's server (`WARDEN_KEYS_URL`) and allow the
//! product host `127.0.0.1`. Two ways to arrange that:
//!
//! - bind first, then configure the app: [`Rehearsal::start`] binds ([`Options::listen`],
//!   `127.0.0.1:0` by default), [`Rehearsal::keys_url`] is what the app needs, then
//!   [`Rehearsal::run_against`] the app's descriptor (what the tests do);
//! - a fixed address known in advance: `--keys-listen 127.0.0.1:PORT`, the app started with
//!   `WARDEN_KEYS_URL=http://127.0.0.1:PORT` before the rehearsal (what CI does).
//!
//! Expected statuses are warden's (see `src/error.rs`). For any Connect app a check passes when
//! the status class matches (2xx accepted, 4xx refused); with [`Options::strict`] the exact
//! status is required.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use super::client::{
    http_client, AppCaller, AppDescriptor, DescriptorOptions, Exchange, DEFAULT_TIMEOUT,
};
use super::keys::{sign_rs256, sign_rs256_with_kid, KeyRing, SigningKey};
use super::server::DevServer;
use super::state::{new_secret, StateDir, Tenant};
use connect_protocol::jwt::{self, Audience};
use connect_protocol::lifecycle::LifecycleEvent;

/// The account id of product requests unless [`Options::account_id`] says otherwise.
/// How long the rehearsal waits for an app to retire the old site of an import (an app may
/// confirm the import with the site first, retrying while the site does not answer).
const SITE_IMPORT_SETTLES_WITHIN: Duration = Duration::from_secs(20);

pub const DEFAULT_ACCOUNT_ID: &str = "557058:devtenant-user";

/// Scenario names, as they appear in the table.
pub mod scenario {
    pub const SIGNED_INSTALL: &str = "signed install";
    pub const SECRET_ROLL: &str = "secret roll";
    pub const UNSIGNED_INSTALL_REFUSED: &str = "unsigned install refused";
    pub const SEED_001: &str = "secret migration";
    pub const UNINSTALL_REINSTALL: &str = "uninstall + reinstall";
    pub const DISABLE_ENABLE: &str = "disable + enable";
    pub const SITE_IMPORT: &str = "site import";
    pub const KEY_ROTATION: &str = "key rotation";
    pub const FORGED_UNSIGNED: &str = "forged: unsigned";
    pub const FORGED_WRONG_KEY: &str = "forged: wrong key";
    pub const FORGED_WRONG_AUD: &str = "forged: wrong aud";
    pub const FORGED_REPLAY: &str = "forged: replay";
    pub const FORGED_ISS_MISMATCH: &str = "forged: iss mismatch";
    pub const FORGED_FOREIGN_HOST: &str = "forged: foreign host";
    pub const FORGED_EXPIRED: &str = "forged: expired";
    pub const FORGED_ALG_NONE: &str = "forged: alg none";
}

/// What to rehearse against, and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The app's descriptor URL.
    pub descriptor: String,
    pub allow_remote: bool,
    /// Where to send requests instead of the descriptor's `baseUrl` (see [`DescriptorOptions`]).
    pub app_url: Option<String>,
    /// The app runs in legacy mode (unsigned first installs, HS256 reinstalls): rehearse seed
    /// 001 instead of checking that an unsigned install is refused.
    pub legacy: bool,
    /// Require warden's exact status, not only its class.
    pub strict: bool,
    /// The app's grace window for the previous secret after a roll (`WARDEN_SECRET_GRACE_SECONDS`).
    pub grace_seconds: u64,
    /// A route of the app that requires a product JWT and answers 200 (`GET`).
    pub probe_path: String,
    /// Where the key server and fake host listen (`127.0.0.1:0`: a free port).
    pub listen: String,
    /// Keep the key ring here (and rotate it there); in memory when `None`.
    pub state_dir: Option<PathBuf>,
    /// Serve and sign with this ring instead (tests that made their keys once).
    pub keyring: Option<Arc<RwLock<KeyRing>>>,
    /// A key not in the ring: the forger's key, then the key rotated to. Generated when `None`.
    pub spare_key: Option<SigningKey>,
    /// `sub` of product requests.
    pub account_id: String,
    /// Print every exchange as it happens.
    pub verbose: bool,
    /// Timeout of one request to the app.
    pub timeout: Duration,
    /// How long to wait for the app's descriptor while the app does not answer yet.
    pub wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            descriptor: String::new(),
            allow_remote: false,
            app_url: None,
            legacy: false,
            strict: false,
            grace_seconds: 0,
            probe_path: "/api/tenant".into(),
            listen: "127.0.0.1:0".into(),
            state_dir: None,
            keyring: None,
            spare_key: None,
            account_id: DEFAULT_ACCOUNT_ID.into(),
            verbose: false,
            timeout: DEFAULT_TIMEOUT,
            wait: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// Against an app in signed-install mode (warden's default).
    pub fn signed() -> Self {
        Self::default()
    }

    /// Against an app in legacy mode (`WARDEN_INSTALL_AUTH=legacy`).
    pub fn legacy() -> Self {
        Self {
            legacy: true,
            ..Self::default()
        }
    }

    pub fn with_descriptor(mut self, url: impl Into<String>) -> Self {
        self.descriptor = url.into();
        self
    }

    pub fn with_keys(mut self, keyring: Arc<RwLock<KeyRing>>, spare_key: SigningKey) -> Self {
        self.keyring = Some(keyring);
        self.spare_key = Some(spare_key);
        self
    }

    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
}

/// What a check expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// A 2xx; warden answers this status.
    Accepted(u16),
    /// A 4xx; warden answers this status.
    Refused(u16),
    /// Anything else, described.
    Value(String),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Accepted(s) => write!(f, "2xx ({s})"),
            Expected::Refused(s) => write!(f, "4xx ({s})"),
            Expected::Value(v) => f.write_str(v),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not checked (the descriptor declares no such callback, the app reports no such field).
    Skip,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        })
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub check: String,
    pub expected: String,
    pub observed: String,
    pub verdict: Verdict,
    pub note: String,
    /// The exchange behind the row, printed under the table for failures.
    pub detail: Option<String>,
}

/// The outcome of a rehearsal.
#[derive(Debug, Clone)]
pub struct Report {
    /// One line about the app (key, base URL, lifecycle paths).
    pub app: String,
    pub legacy: bool,
    pub strict: bool,
    pub keys_url: String,
    pub rows: Vec<Row>,
    pub elapsed: Duration,
}

impl Report {
    /// No check failed.
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    pub fn failures(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.verdict == Verdict::Fail)
    }

    /// The rows of `scenario`.
    pub fn scenario(&self, scenario: &str) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect()
    }

    /// Whether some check of `scenario` failed.
    pub fn scenario_failed(&self, scenario: &str) -> bool {
        self.rows
            .iter()
            .any(|r| r.scenario == scenario && r.verdict == Verdict::Fail)
    }

    /// Whether `scenario` ran and every check of it passed (or was skipped).
    pub fn scenario_passed(&self, scenario: &str) -> bool {
        let rows = self.scenario(scenario);
        !rows.is_empty() && rows.iter().all(|r| r.verdict != Verdict::Fail)
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.rows.iter().filter(|r| r.verdict == verdict).count()
    }

    /// The table alone.
    pub fn table(&self) -> String {
        let headers = [
            "SCENARIO", "CHECK", "EXPECTED", "OBSERVED", "RESULT", "NOTE",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.scenario.clone(),
                    r.check.clone(),
                    r.expected.clone(),
                    r.observed.clone(),
                    r.verdict.to_string(),
                    r.note.clone(),
                ]
            })
            .collect();
        let mut widths = headers.map(|h| h.chars().count());
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    out.push_str(" | ");
                }
                out.push_str(cell);
                if i + 1 < cells.len() {
                    out.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = line(&headers.map(str::to_owned));
        out.push('\n');
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&rule.join("-+-"));
        for row in &cells {
            out.push('\n');
            out.push_str(&line(row));
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rehearsal of {}", self.app)?;
        writeln!(
            f,
            "mode: {}{}; install keys served at {}",
            if self.legacy {
                "legacy"
            } else {
                "signed installs"
            },
            if self.strict { ", strict statuses" } else { "" },
            self.keys_url
        )?;
        writeln!(f)?;
        writeln!(f, "{}", self.table())?;
        writeln!(f)?;
        write!(
            f,
            "{} checks: {} passed, {} failed, {} skipped in {:.1} s",
            self.rows.len(),
            self.count(Verdict::Pass),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip),
            self.elapsed.as_secs_f64()
        )?;
        let failures: Vec<&Row> = self.failures().collect();
        if !failures.is_empty() {
            writeln!(f, "\n\nfailed checks:")?;
            for row in failures {
                write!(
                    f,
                    "\n[{}] {}: expected {}, observed {}",
                    row.scenario, row.check, row.expected, row.observed
                )?;
                if let Some(detail) = &row.detail {
                    for line in detail.lines() {
                        write!(f, "\n    {line}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Binds, then runs the catalogue against `options.descriptor`.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    Rehearsal::start(options).await?.run().await
}

/// A rehearsal whose key server and fake host are listening; run it once the app points at
/// [`keys_url`](Self::keys_url).
pub struct Rehearsal {
    options: Options,
    server: DevServer,
    spare: tokio::task::JoinHandle<SigningKey>,
}

impl fmt::Debug for Rehearsal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rehearsal")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Rehearsal {
    /// Loads (or makes) the key ring and starts the key server and fake host on
    /// [`Options::listen`]. Generating keys is slow in debug builds; the spare key is made in the
    /// background meanwhile.
    pub async fn start(mut options: Options) -> anyhow::Result<Self> {
        let keyring = match (options.keyring.take(), &options.state_dir) {
            (Some(ring), _) => ring,
            (None, Some(dir)) => {
                let dir = StateDir::new(dir.clone());
                let ring = tokio::task::spawn_blocking(move || dir.keyring()).await??;
                Arc::new(RwLock::new(ring))
            }
            (None, None) => {
                let ring = tokio::task::spawn_blocking(KeyRing::in_memory).await?;
                Arc::new(RwLock::new(ring))
            }
        };
        let spare = match options.spare_key.take() {
            Some(key) => tokio::spawn(async move { key }),
            None => tokio::task::spawn_blocking(SigningKey::generate),
        };
        let server = DevServer::start(options.listen.as_str(), keyring)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        Ok(Self {
            options,
            server,
            spare,
        })
    }

    /// The value for the app's `WARDEN_KEYS_URL`.
    pub fn keys_url(&self) -> String {
        self.server.keys_url()
    }

    /// The value for the app's `WARDEN_OAUTH_TOKEN_URL`.
    pub fn token_url(&self) -> String {
        self.server.token_url()
    }

    pub fn server(&self) -> &DevServer {
        &self.server
    }

    /// Runs the catalogue against the app whose descriptor is at `descriptor`.
    pub async fn run_against(mut self, descriptor: &str) -> anyhow::Result<Report> {
        self.options.descriptor = descriptor.to_owned();
        self.run().await
    }

    /// Runs the catalogue against [`Options::descriptor`].
    pub async fn run(self) -> anyhow::Result<Report> {
        let started = Instant::now();
        let Rehearsal {
            options,
            server,
            spare,
        } = self;
        let http = http_client(options.timeout);
        let descriptor_options = DescriptorOptions {
            allow_remote: options.allow_remote,
            app_url: options.app_url.clone(),
        };
        let app = AppDescriptor::fetch_waiting(
            &http,
            &options.descriptor,
            &descriptor_options,
            options.wait,
        )
        .await?;
        if app.installed.is_none() {
            anyhow::bail!(
                "the descriptor at {} declares no installed lifecycle path: nothing to rehearse",
                app.url
            );
        }
        let summary = app.summary();
        if options.verbose {
            println!("rehearsing {summary}");
            println!("install keys and fake host at {}\n", server.url());
        }
        let mut spare = spare.await.context("generating the spare key failed")?;
        let in_ring = server
            .keyring()
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&spare.kid)
            .is_some();
        if in_ring {
            spare = tokio::task::spawn_blocking(SigningKey::generate).await?;
        }
        let mut ctx = Ctx {
            client: AppCaller::new(http, app),
            server: &server,
            options: &options,
            rows: Vec::new(),
            spare,
        };
        ctx.catalogue().await?;
        let report = Report {
            app: summary,
            legacy: options.legacy,
            strict: options.strict,
            keys_url: server.keys_url(),
            rows: ctx.rows,
            elapsed: started.elapsed(),
        };
        server.stop().await;
        Ok(report)
    }
}

/// A product request signed with an old secret, to be sent once the grace window is over.
struct DeferredGraceCheck {
    row: usize,
    client_key: String,
    old_secret: String,
    iat: i64,
    not_before: i64,
}

struct Ctx<'a> {
    client: AppCaller,
    server: &'a DevServer,
    options: &'a Options,
    rows: Vec<Row>,
    spare: SigningKey,
}

impl Ctx<'_> {
    async fn catalogue(&mut self) -> anyhow::Result<()> {
        let mut victim = self.signed_install_scenario().await?;
        let grace = self.secret_roll_scenario(&mut victim).await?;
        if self.options.legacy {
            self.seed_001_scenario().await?;
        } else {
            self.unsigned_install_scenario().await?;
        }
        self.uninstall_reinstall_scenario().await?;
        self.disable_enable_scenario().await?;
        self.site_import_scenario().await?;
        self.forged_unsigned(&victim).await?;
        self.forged_wrong_key().await?;
        self.forged_wrong_aud().await?;
        self.forged_replay().await?;
        self.forged_iss_mismatch().await?;
        self.forged_foreign_host().await?;
        self.forged_expired().await?;
        self.forged_alg_none().await?;
        // After the forged ones: the wrong-key scenario needs the spare key not yet served.
        self.key_rotation_scenario().await?;
        self.finish_grace_check(grace).await
    }

    // ---- building blocks ----

    fn app_key(&self) -> &str {
        &self.client.app.key
    }

    fn new_tenant(&self, label: &str) -> Tenant {
        let mut tenant = Tenant::generate(None, &self.server.url());
        tenant.name = format!("{label}-{}", &tenant.client_key[..8]);
        tenant.app_key = Some(self.app_key().to_owned());
        tenant.descriptor_url = Some(self.client.app.url.clone());
        tenant
    }

    /// Tells the fake host about the site (and its current secret), as Atlassian knows a site
    /// before it sends the install.
    fn register(&self, tenant: &Tenant) {
        if let Some(record) = tenant.host_record() {
            self.server.host().register_tenant(record);
        }
    }

    fn current_key(&self) -> SigningKey {
        self.server
            .keyring()
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current()
            .clone()
    }

    fn log(&self, title: &str, exchange: &Exchange) {
        if self.options.verbose {
            println!("-- {title}\n{exchange}\n");
        }
    }

    /// A signed `installed` carrying the tenant's current secret, checked as accepted; returns
    /// the token (for a replay).
    async fn signed_install(
        &mut self,
        s: &str,
        check: impl Into<String>,
        tenant: &mut Tenant,
    ) -> anyhow::Result<String> {
        self.register(tenant);
        let token =
            self.client
                .install_token(&self.current_key(), tenant, LifecycleEvent::Installed)?;
        let exchange = self
            .check_callback(
                s,
                check,
                Expected::Accepted(204),
                LifecycleEvent::Installed,
                Some(&token),
                tenant,
            )
            .await?;
        tenant.installed = exchange.is_success();
        Ok(token)
    }

    /// Sends the `event` callback of `tenant` with `token` as its JWT (unsigned when `None`)
    /// and records the check of the answer against `expected`.
    async fn check_callback(
        &mut self,
        s: &str,
        check: impl Into<String>,
        expected: Expected,
        event: LifecycleEvent,
        token: Option<&str>,
        tenant: &Tenant,
    ) -> anyhow::Result<Exchange> {
        let body = tenant.body(self.app_key(), event.name());
        let exchange = self.client.send_callback(event, token, &body).await?;
        self.check(s, check, expected, &exchange);
        Ok(exchange)
    }

    /// A forged `installed` for `tenant` (`token`: its JWT, unsigned when `None`): checks that
    /// it is refused with `status`, then that nothing was stored (a product request with the
    /// forged secret must fail).
    async fn forged_install(
        &mut self,
        s: &str,
        check: &str,
        status: u16,
        tenant: &Tenant,
        token: Option<&str>,
    ) -> anyhow::Result<()> {
        self.check_callback(
            s,
            check,
            Expected::Refused(status),
            LifecycleEvent::Installed,
            token,
            tenant,
        )
        .await?;
        self.check_probe(
            s,
            "with the forged secret",
            Expected::Refused(401),
            &tenant.client_key,
            &tenant.shared_secret,
            jwt::now(),
        )
        .await?;
        Ok(())
    }

    /// `GET <probe path>` as `client_key`, signed with `secret`, issued at `iat`.
    async fn probe(&self, client_key: &str, secret: &str, iat: i64) -> anyhow::Result<Exchange> {
        let path = &self.options.probe_path;
        let token = self.client.product_token(
            secret,
            client_key,
            "GET",
            path,
            &self.options.account_id,
            iat,
        )?;
        self.client.product_request("GET", path, &token, None).await
    }

    /// Records the check of a [`probe`](Self::probe) against `expected`; `what` ends the
    /// check's label.
    async fn check_probe(
        &mut self,
        s: &str,
        what: &str,
        expected: Expected,
        client_key: &str,
        secret: &str,
        iat: i64,
    ) -> anyhow::Result<Exchange> {
        let exchange = self.probe(client_key, secret, iat).await?;
        self.check(s, self.probe_label(what), expected, &exchange);
        Ok(exchange)
    }

    /// [`check_probe`](Self::check_probe) as `tenant`, with its current secret, issued now.
    async fn check_tenant_probe(
        &mut self,
        s: &str,
        what: &str,
        expected: Expected,
        tenant: &Tenant,
    ) -> anyhow::Result<Exchange> {
        self.check_probe(
            s,
            what,
            expected,
            &tenant.client_key,
            &tenant.shared_secret,
            jwt::now(),
        )
        .await
    }

    fn probe_label(&self, what: &str) -> String {
        format!("GET {} {what}", self.options.probe_path)
    }

    /// Records the check of `exchange` against `expected`; returns whether it passed.
    fn check(
        &mut self,
        scenario: &str,
        check: impl Into<String>,
        expected: Expected,
        exchange: &Exchange,
    ) -> bool {
        let check = check.into();
        self.log(&format!("{scenario}: {check}"), exchange);
        let (verdict, note) = judge(&expected, exchange.status, self.options.strict);
        let passed = verdict == Verdict::Pass;
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            check,
            expected: expected.to_string(),
            observed: exchange.observed(),
            verdict,
            note,
            detail: Some(exchange.to_string()),
        });
        passed
    }

    fn skip(
        &mut self,
        scenario: &str,
        check: impl Into<String>,
        expected: Expected,
        note: impl Into<String>,
    ) {
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            check: check.into(),
            expected: expected.to_string(),
            observed: "-".into(),
            verdict: Verdict::Skip,
            note: note.into(),
            detail: None,
        });
    }

    /// A callback the descriptor does not declare: the rows are skipped.
    fn declared(&mut self, scenario: &str, event: LifecycleEvent) -> bool {
        if self.client.app.lifecycle_path(event).is_some() {
            return true;
        }
        self.skip(
            scenario,
            format!("{} callback", event.name()),
            Expected::Value("-".into()),
            format!("the descriptor declares no {} path", event.name()),
        );
        false
    }

    // ---- scenarios ----

    async fn signed_install_scenario(&mut self) -> anyhow::Result<Tenant> {
        let s = scenario::SIGNED_INSTALL;
        let mut tenant = self.new_tenant("signed");
        self.signed_install(s, "installed, RS256 signed", &mut tenant)
            .await?;
        self.check_tenant_probe(s, "with the secret", Expected::Accepted(200), &tenant)
            .await?;
        Ok(tenant)
    }

    async fn secret_roll_scenario(
        &mut self,
        tenant: &mut Tenant,
    ) -> anyhow::Result<DeferredGraceCheck> {
        let s = scenario::SECRET_ROLL;
        let old = tenant.shared_secret.clone();
        let before_roll = jwt::now();
        tenant.roll_to(new_secret());
        self.signed_install(s, "installed again with a new secret", tenant)
            .await?;
        let after_roll = jwt::now();
        self.check_probe(
            s,
            "with the new secret",
            Expected::Accepted(200),
            &tenant.client_key,
            &tenant.shared_secret,
            after_roll,
        )
        .await?;
        self.check_probe(
            s,
            "old secret, issued after the roll",
            Expected::Refused(401),
            &tenant.client_key,
            &old,
            after_roll,
        )
        .await?;
        // Filled in at the end, once the grace window is over (other scenarios run meanwhile).
        let row = self.rows.len();
        let grace = self.options.grace_seconds;
        self.skip(
            s,
            self.probe_label(&format!(
                "old secret, issued before the roll, after the {grace} s grace"
            )),
            Expected::Refused(401),
            "pending",
        );
        Ok(DeferredGraceCheck {
            row,
            client_key: tenant.client_key.clone(),
            old_secret: old,
            iat: before_roll - 5,
            not_before: after_roll + i64::try_from(grace).unwrap_or(i64::MAX / 2) + 1,
        })
    }

    async fn finish_grace_check(&mut self, grace: DeferredGraceCheck) -> anyhow::Result<()> {
        let mut waited = false;
        while jwt::now() < grace.not_before {
            waited = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let exchange = self
            .probe(&grace.client_key, &grace.old_secret, grace.iat)
            .await?;
        let placeholder = self.rows.remove(grace.row);
        self.check(
            &placeholder.scenario,
            placeholder.check,
            Expected::Refused(401),
            &exchange,
        );
        let mut row = self.rows.pop().expect("check pushed a row");
        if waited {
            row.note = join_note(&row.note, "waited for the grace window");
        }
        if exchange.is_success() {
            row.note = join_note(
                &row.note,
                "accepted: is the app's grace window longer than --grace-seconds?",
            );
        }
        self.rows.insert(grace.row, row);
        Ok(())
    }

    async fn unsigned_install_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::UNSIGNED_INSTALL_REFUSED;
        let tenant = self.new_tenant("unsigned");
        self.check_callback(
            s,
            "installed without a token",
            Expected::Refused(401),
            LifecycleEvent::Installed,
            None,
            &tenant,
        )
        .await?;
        self.check_tenant_probe(
            s,
            "with its secret: nothing stored",
            Expected::Refused(401),
            &tenant,
        )
        .await?;
        Ok(())
    }

    /// The secret migration (docs/PROTOCOL.md §5): install unsigned, the uninstall ignored (not sent), install again signed
    /// HS256 with the old secret and carrying a new one.
    async fn seed_001_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::SEED_001;
        let mut tenant = self.new_tenant("migration");
        self.register(&tenant);
        self.check_callback(
            s,
            "installed, unsigned (legacy first install)",
            Expected::Accepted(204),
            LifecycleEvent::Installed,
            None,
            &tenant,
        )
        .await?;
        self.check_tenant_probe(s, "with the first secret", Expected::Accepted(200), &tenant)
            .await?;
        // (uninstalled: ignored, nothing sent)
        let old = tenant.shared_secret.clone();
        tenant.roll_to(new_secret());
        self.register(&tenant);
        let token = self
            .client
            .tenant_token(&old, &mut tenant, LifecycleEvent::Installed)?;
        self.check_callback(
            s,
            "installed again, HS256 by the old secret, new secret in body",
            Expected::Accepted(204),
            LifecycleEvent::Installed,
            Some(&token),
            &tenant,
        )
        .await?;
        let now = jwt::now();
        self.check_probe(
            s,
            "with the new secret",
            Expected::Accepted(200),
            &tenant.client_key,
            &tenant.shared_secret,
            now,
        )
        .await?;
        self.check_probe(
            s,
            "with the old secret",
            Expected::Refused(401),
            &tenant.client_key,
            &old,
            now,
        )
        .await?;
        Ok(())
    }

    async fn uninstall_reinstall_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::UNINSTALL_REINSTALL;
        if !self.declared(s, LifecycleEvent::Uninstalled) {
            return Ok(());
        }
        let mut tenant = self.new_tenant("reinstall");
        self.signed_install(s, "installed", &mut tenant).await?;
        let token = self.client.install_token(
            &self.current_key(),
            &mut tenant,
            LifecycleEvent::Uninstalled,
        )?;
        self.check_callback(
            s,
            "uninstalled, RS256 signed",
            Expected::Accepted(204),
            LifecycleEvent::Uninstalled,
            Some(&token),
            &tenant,
        )
        .await?;
        self.check_tenant_probe(s, "while uninstalled", Expected::Refused(403), &tenant)
            .await?;
        tenant.roll_to(new_secret());
        self.signed_install(s, "installed again (new secret)", &mut tenant)
            .await?;
        self.check_tenant_probe(s, "after the reinstall", Expected::Accepted(200), &tenant)
            .await?;
        Ok(())
    }

    async fn disable_enable_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::DISABLE_ENABLE;
        if !self.declared(s, LifecycleEvent::Disabled) || !self.declared(s, LifecycleEvent::Enabled)
        {
            return Ok(());
        }
        let mut tenant = self.new_tenant("disable");
        self.signed_install(s, "installed", &mut tenant).await?;
        for (event, status) in [
            (LifecycleEvent::Disabled, 403),
            (LifecycleEvent::Enabled, 200),
        ] {
            let secret = tenant.shared_secret.clone();
            let token = self.client.tenant_token(&secret, &mut tenant, event)?;
            self.check_callback(
                s,
                format!("{}, HS256 by the secret", event.name()),
                Expected::Accepted(204),
                event,
                Some(&token),
                &tenant,
            )
            .await?;
            let expected = if status == 200 {
                Expected::Accepted(200)
            } else {
                Expected::Refused(status)
            };
            self.check_tenant_probe(s, &format!("while {}", event.name()), expected, &tenant)
                .await?;
        }
        Ok(())
    }

    /// A site import (docs/PROTOCOL.md §7): a new clientKey and oauthClientId on the same baseUrl, no uninstall for the
    /// old one.
    async fn site_import_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::SITE_IMPORT;
        let mut old = self.new_tenant("import-old");
        self.signed_install(s, "old site installed", &mut old)
            .await?;
        let mut new = old.imported(None);
        new.name = format!("import-new-{}", &new.client_key[..8]);
        // The host now knows the site by its new identity (same address).
        self.signed_install(
            s,
            "new clientKey + oauthClientId on the same baseUrl installed",
            &mut new,
        )
        .await?;
        // An app may first confirm the import with the site (warden calls the site's
        // `/rest/atlassian-connect/1/addons/<key>` as the app with the new secret) and retire
        // the old installation only then: wait for the old site to be refused.
        let deadline = Instant::now() + SITE_IMPORT_SETTLES_WITHIN;
        let old_probe = loop {
            let exchange = self
                .probe(&old.client_key, &old.shared_secret, jwt::now())
                .await?;
            let refused = exchange.status.is_some_and(|s| (400..500).contains(&s));
            if refused || Instant::now() >= deadline {
                break exchange;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.check(
            s,
            self.probe_label("as the old site"),
            Expected::Refused(403),
            &old_probe,
        );
        // The link on the new installation may be written just after the old one is retired.
        loop {
            let exchange = self
                .probe(&new.client_key, &new.shared_secret, jwt::now())
                .await?;
            let linked = exchange
                .json()
                .and_then(|j| j.get("supersedes").cloned())
                .and_then(|v| v.as_array().map(|a| !a.is_empty()))
                .unwrap_or(true);
            if linked || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let new_probe = self
            .check_probe(
                s,
                "as the new site",
                Expected::Accepted(200),
                &new.client_key,
                &new.shared_secret,
                jwt::now(),
            )
            .await?;

        let expected = format!("supersedes [{}]", short_key(&old.client_key));
        let check = "link recorded (probe of the new site)";
        let supersedes = new_probe.json().and_then(|j| j.get("supersedes").cloned());
        let (observed, verdict, note) = match (&supersedes, new_probe.is_success()) {
            (_, false) => ("probe failed".to_owned(), Verdict::Fail, String::new()),
            (None, true) if !self.options.strict => (
                "no supersedes field".to_owned(),
                Verdict::Skip,
                "the probe route does not report links".to_owned(),
            ),
            (None, true) => (
                "no supersedes field".to_owned(),
                Verdict::Fail,
                String::new(),
            ),
            (Some(value), true) => {
                let keys: Vec<&str> = value
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let shown = format!(
                    "supersedes [{}]",
                    keys.iter()
                        .map(|k| short_key(k))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let verdict = if keys.contains(&old.client_key.as_str()) {
                    Verdict::Pass
                } else {
                    Verdict::Fail
                };
                (shown, verdict, String::new())
            }
        };
        self.rows.push(Row {
            scenario: s.to_owned(),
            check: check.to_owned(),
            expected,
            observed,
            verdict,
            note,
            detail: Some(new_probe.to_string()),
        });
        Ok(())
    }

    async fn key_rotation_scenario(&mut self) -> anyhow::Result<()> {
        let s = scenario::KEY_ROTATION;
        let rotated = {
            let mut ring = self
                .server
                .keyring()
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ring.rotate_to(self.spare.clone()).map(|k| k.kid.clone())
        };
        let kid = match rotated {
            Ok(kid) => kid,
            Err(e) => {
                self.rows.push(Row {
                    scenario: s.to_owned(),
                    check: "rotate the key ring".into(),
                    expected: "new kid".into(),
                    observed: "error".into(),
                    verdict: Verdict::Fail,
                    note: e.to_string(),
                    detail: None,
                });
                return Ok(());
            }
        };
        let mut tenant = self.new_tenant("rotated");
        self.signed_install(
            s,
            format!("installed, signed with the new kid {}", short_key(&kid)),
            &mut tenant,
        )
        .await?;
        self.check_tenant_probe(s, "with the secret", Expected::Accepted(200), &tenant)
            .await?;
        Ok(())
    }

    /// An unsigned `installed` for an installed site, carrying the attacker's secret.
    async fn forged_unsigned(&mut self, victim: &Tenant) -> anyhow::Result<()> {
        let s = scenario::FORGED_UNSIGNED;
        let mut forged = victim.clone();
        forged.shared_secret = new_secret();
        self.forged_install(
            s,
            "unsigned installed for an installed site, other secret",
            401,
            &forged,
            None,
        )
        .await?;
        self.check_tenant_probe(
            s,
            "with the genuine secret",
            Expected::Accepted(200),
            victim,
        )
        .await?;
        Ok(())
    }

    /// RS256 by a key the key server does not serve, under a kid it does serve.
    async fn forged_wrong_key(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_WRONG_KEY;
        let mut tenant = self.new_tenant("wrongkey");
        let claims =
            self.client
                .install_claims(&mut tenant, LifecycleEvent::Installed, jwt::now())?;
        let kid = self.current_key().kid;
        let token = sign_rs256_with_kid(&self.spare, &kid, &claims);
        self.forged_install(
            s,
            "RS256 by another key under the served kid",
            401,
            &tenant,
            Some(&token),
        )
        .await
    }

    async fn forged_wrong_aud(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_WRONG_AUD;
        let mut tenant = self.new_tenant("wrongaud");
        let mut claims =
            self.client
                .install_claims(&mut tenant, LifecycleEvent::Installed, jwt::now())?;
        claims.aud = Some(Audience::One("https://another-app.example.com".into()));
        let token = sign_rs256(&self.current_key(), &claims);
        self.forged_install(s, "aud names another app", 401, &tenant, Some(&token))
            .await
    }

    /// A captured install token sent again with the attacker's secret in the body.
    async fn forged_replay(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_REPLAY;
        let mut tenant = self.new_tenant("replay");
        let token = self
            .signed_install(s, "installed (the token is captured)", &mut tenant)
            .await?;
        let mut forged = tenant.clone();
        forged.shared_secret = new_secret();
        self.forged_install(
            s,
            "same token, body with another secret",
            409,
            &forged,
            Some(&token),
        )
        .await?;
        self.check_tenant_probe(
            s,
            "with the genuine secret",
            Expected::Accepted(200),
            &tenant,
        )
        .await?;
        Ok(())
    }

    /// A genuine token of one site (`iss`) with another site's clientKey in the body.
    async fn forged_iss_mismatch(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_ISS_MISMATCH;
        let mut attacker = self.new_tenant("attacker");
        let tenant = self.new_tenant("issvictim");
        let token = self.client.install_token(
            &self.current_key(),
            &mut attacker,
            LifecycleEvent::Installed,
        )?;
        self.forged_install(
            s,
            "iss is another clientKey than the body's",
            403,
            &tenant,
            Some(&token),
        )
        .await
    }

    /// A genuine token, but the body's baseUrl is on a host the app does not serve.
    async fn forged_foreign_host(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_FOREIGN_HOST;
        let mut tenant = self.new_tenant("foreign");
        // Loopback, so nothing leaves the machine, but not the allowed 127.0.0.1.
        tenant.base_url = format!(
            "http://127.0.0.2:{}/t/{}",
            self.server.addr().port(),
            tenant.client_key
        );
        let token = self.client.install_token(
            &self.current_key(),
            &mut tenant,
            LifecycleEvent::Installed,
        )?;
        self.forged_install(
            s,
            "baseUrl on 127.0.0.2 (not an allowed host)",
            403,
            &tenant,
            Some(&token),
        )
        .await
    }

    async fn forged_expired(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_EXPIRED;
        let mut tenant = self.new_tenant("expired");
        let now = jwt::now();
        let mut claims =
            self.client
                .install_claims(&mut tenant, LifecycleEvent::Installed, now - 600)?;
        claims.exp = Some(now - 300);
        let token = sign_rs256(&self.current_key(), &claims);
        self.forged_install(s, "exp 300 s in the past", 401, &tenant, Some(&token))
            .await
    }

    async fn forged_alg_none(&mut self) -> anyhow::Result<()> {
        let s = scenario::FORGED_ALG_NONE;
        let mut tenant = self.new_tenant("algnone");
        let claims =
            self.client
                .install_claims(&mut tenant, LifecycleEvent::Installed, jwt::now())?;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let token = format!("{header}.{payload}.");
        self.forged_install(s, "alg none, no signature", 401, &tenant, Some(&token))
            .await
    }
}

/// The verdict of a status against `expected`, and a note.
fn judge(expected: &Expected, status: Option<u16>, strict: bool) -> (Verdict, String) {
    let Some(status) = status else {
        return (Verdict::Fail, "no answer".into());
    };
    let (exact, class_ok) = match expected {
        Expected::Accepted(s) => (*s, (200..300).contains(&status)),
        Expected::Refused(s) => (*s, (400..500).contains(&status)),
        Expected::Value(_) => return (Verdict::Fail, "not a status check".into()),
    };
    match (class_ok, status == exact) {
        (true, true) => (Verdict::Pass, String::new()),
        (true, false) if strict => (Verdict::Fail, format!("strict: {exact} required")),
        (true, false) => (Verdict::Pass, format!("warden answers {exact}")),
        (false, _) => (Verdict::Fail, String::new()),
    }
}

fn join_note(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}; {b}")
    }
}

/// The first 8 characters of a clientKey or kid, for the table.
fn short_key(key: &str) -> String {
    if key.chars().count() <= 12 {
        key.to_owned()
    } else {
        format!("{}…", key.chars().take(8).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_class_passes_and_strict_wants_the_exact_status() {
        assert_eq!(
            judge(&Expected::Refused(401), Some(401), false).0,
            Verdict::Pass
        );
        let (verdict, note) = judge(&Expected::Refused(401), Some(403), false);
        assert_eq!(verdict, Verdict::Pass);
        assert!(note.contains("401"));
        assert_eq!(
            judge(&Expected::Refused(401), Some(403), true).0,
            Verdict::Fail
        );
        assert_eq!(
            judge(&Expected::Refused(401), Some(204), false).0,
            Verdict::Fail
        );
        assert_eq!(
            judge(&Expected::Accepted(204), Some(200), false).0,
            Verdict::Pass
        );
        assert_eq!(
            judge(&Expected::Accepted(204), Some(500), false).0,
            Verdict::Fail
        );
        assert_eq!(
            judge(&Expected::Accepted(204), None, false).0,
            Verdict::Fail
        );
    }

    #[test]
    fn table_aligns_columns() {
        let row = |scenario: &str, verdict| Row {
            scenario: scenario.into(),
            check: "c".into(),
            expected: Expected::Refused(401).to_string(),
            observed: "401".into(),
            verdict,
            note: String::new(),
            detail: None,
        };
        let report = Report {
            app: "app".into(),
            legacy: false,
            strict: false,
            keys_url: "http://127.0.0.1:1".into(),
            rows: vec![row("a", Verdict::Pass), row("longer name", Verdict::Fail)],
            elapsed: Duration::from_millis(10),
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("SCENARIO    | CHECK | EXPECTED"));
        assert!(lines[2].starts_with("a           | c     | 4xx (401)"));
        assert!(lines[3].contains("FAIL"));
        assert!(!report.passed());
        assert!(report.scenario_failed("longer name"));
        assert!(report.scenario_passed("a"));
        assert!(report.to_string().contains("failed checks"));
    }
}

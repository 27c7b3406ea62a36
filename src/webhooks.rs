//! Webhooks declared in the descriptor (`modules.webhooks`), handed to the vendor's handlers.
//!
//! A delivery is authenticated like a product request (the tenant's HS256 JWT, `qsh` checked),
//! answered `204` at once, and put on a bounded queue that a pool of workers drains, one handler
//! call each at a time: Atlassian expects a quick answer, and a slow handler must not hold the
//! connection. A full queue answers `503` with `Retry-After` so that Atlassian delivers again
//! later. Deliveries are deduplicated by (clientKey, `X-Atlassian-Webhook-Identifier`) for a
//! bounded window, so Atlassian's retries of a delivery already accepted are not handed over
//! twice (docs/PROTOCOL.md §15).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use tokio::sync::mpsc;

use crate::guard::ProductRequest;
use crate::routes::descriptor::DeclaredWebhook;
use crate::startup::AppState;
use connect_protocol::domain::ClientKey;

/// The header Atlassian sends with the same value on every attempt of one delivery.
pub const IDENTIFIER_HEADER: &str = "x-atlassian-webhook-identifier";
/// Longest identifier remembered; a longer one is refused (`400`).
pub const MAX_IDENTIFIER_CHARS: usize = 256;
/// Largest webhook body read (`413` beyond): an issue with many fields and comments is large,
/// but not this large.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How many (clientKey, identifier) pairs are remembered at most, whatever the window.
pub const DEDUPE_CAPACITY: u64 = 100_000;
/// What a `503` for a full queue asks Atlassian to wait before delivering again.
pub const RETRY_AFTER_SECONDS: u64 = 10;

/// `WARDEN_WEBHOOK_*`: the queue between the routes and the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Deliveries accepted but not yet taken by a worker.
    pub queue_size: usize,
    /// Handlers running at once.
    pub workers: usize,
    /// How long an identifier is remembered after its delivery was accepted.
    pub dedupe_window: Duration,
}

/// One accepted delivery, as a handler gets it.
pub struct Webhook {
    /// The descriptor's `event`, e.g. `jira:issue_created`.
    pub event: String,
    /// The authenticated site (and the user, when the token names one).
    pub tenant: ProductRequest,
    /// The JSON body as sent.
    pub body: serde_json::Value,
    /// `X-Atlassian-Webhook-Identifier`, when sent.
    pub identifier: Option<String>,
    /// The service: `state.host` calls the site back.
    pub state: web::Data<AppState>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("event", &self.event)
            .field("client_key", &self.tenant.client_key)
            .field("identifier", &self.identifier)
            .finish_non_exhaustive()
    }
}

/// What a handler returns: an error is logged with the event and clientKey (the delivery was
/// already acknowledged; nothing retries it).
pub type HandlerFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type Handler = Arc<dyn Fn(Webhook) -> HandlerFuture + Send + Sync>;

/// The vendor's handlers, by event name.
#[derive(Clone, Default)]
pub struct WebhookHandlers {
    by_event: HashMap<String, Handler>,
}

impl WebhookHandlers {
    /// Registers `handler` for `event` (a later registration for the same event replaces it).
    pub fn on<F, Fut>(&mut self, event: &str, handler: F)
    where
        F: Fn(Webhook) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |webhook| Box::pin(handler(webhook)));
        self.by_event.insert(event.to_owned(), handler);
    }

    /// Adds every handler of `other`, replacing ours for the same events.
    pub fn extend(&mut self, other: WebhookHandlers) {
        self.by_event.extend(other.by_event);
    }

    pub fn is_empty(&self) -> bool {
        self.by_event.is_empty()
    }

    /// A handler for an event the descriptor does not declare would never run: most likely a
    /// typo, so start-up stops naming it.
    pub fn check_declared(&self, declared: &[DeclaredWebhook]) -> anyhow::Result<()> {
        let mut undeclared: Vec<&str> = self
            .by_event
            .keys()
            .filter(|event| !declared.iter().any(|d| &d.event == *event))
            .map(String::as_str)
            .collect();
        undeclared.sort_unstable();
        if undeclared.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "a webhook handler is registered for {} but the descriptor (WARDEN_DESCRIPTOR) declares no modules.webhooks entry for it",
            undeclared.join(", ")
        )
    }
}

/// What became of a delivery the route authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for its handler.
    Accepted,
    /// Its identifier was accepted before for this tenant, within the window: not handed over.
    Duplicate,
    /// No handler is registered for its event: dropped.
    Unhandled,
}

/// Why a delivery was not accepted. `error.rs` gives it its status.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook queue is full ({capacity} deliveries waiting); retry later")]
    QueueFull { capacity: usize },
    /// This tenant's deliveries already fill its share of the queue: one busy site never
    /// takes the queue from the others.
    #[error(
        "this site's webhook deliveries fill its share of the queue ({share} waiting); retry later"
    )]
    TenantShareFull { share: usize },
}

struct Job {
    handler: Handler,
    webhook: Webhook,
    /// Released when a worker takes the job: the tenant's place in the queue.
    _place: QueuePlace,
}

/// Deliveries waiting in the queue, per tenant.
type Waiting = Arc<std::sync::Mutex<HashMap<ClientKey, usize>>>;

/// One waiting delivery of a tenant, counted until dropped.
struct QueuePlace {
    waiting: Waiting,
    client_key: ClientKey,
}

impl QueuePlace {
    /// A place for `client_key`, unless it already has `share` deliveries waiting.
    fn take(waiting: &Waiting, client_key: &ClientKey, share: usize) -> Option<Self> {
        let mut counts = waiting.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(client_key.clone()).or_insert(0);
        if *count >= share {
            return None;
        }
        *count += 1;
        Some(Self {
            waiting: waiting.clone(),
            client_key: client_key.clone(),
        })
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut counts = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.client_key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client_key);
            }
        }
    }
}

/// The queue, its workers and the memory of identifiers seen.
pub struct WebhookQueue {
    handlers: HashMap<String, Handler>,
    sender: mpsc::Sender<Job>,
    capacity: usize,
    /// The most deliveries of one tenant that may wait at once: an eighth of the queue (a
    /// queue of fewer than 16 is shared first come, first served).
    share: usize,
    waiting: Waiting,
    /// (clientKey, identifier) of deliveries accepted within the window: one tenant's
    /// identifier never hides another tenant's delivery.
    seen: moka::sync::Cache<(ClientKey, String), ()>,
}

impl WebhookQueue {
    /// The queue for `handlers`; with any handler, starts `settings.workers` workers on the
    /// current tokio runtime. They stop once the queue is dropped and drained.
    pub fn start(handlers: WebhookHandlers, settings: WebhookSettings) -> Self {
        let (sender, receiver) = mpsc::channel::<Job>(settings.queue_size);
        if !handlers.is_empty() {
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            for _ in 0..settings.workers {
                tokio::spawn(work(receiver.clone()));
            }
        }
        Self {
            handlers: handlers.by_event,
            sender,
            capacity: settings.queue_size,
            share: match settings.queue_size / 8 {
                0 | 1 => usize::MAX,
                eighth => eighth,
            },
            waiting: Waiting::default(),
            seen: moka::sync::Cache::builder()
                .max_capacity(DEDUPE_CAPACITY)
                .time_to_live(settings.dedupe_window)
                .build(),
        }
    }

    /// Whether a handler is registered for `event`.
    pub fn handles(&self, event: &str) -> bool {
        self.handlers.contains_key(event)
    }

    /// Queues `webhook` for its handler, unless its identifier was accepted before for the
    /// same tenant. The identifier is remembered only once the delivery is in the queue: a
    /// delivery refused because the queue is full is processed when Atlassian retries it.
    pub fn accept(&self, webhook: Webhook) -> Result<Delivery, WebhookError> {
        let Some(handler) = self.handlers.get(&webhook.event).cloned() else {
            return Ok(Delivery::Unhandled);
        };
        let key = webhook
            .identifier
            .clone()
            .map(|id| (webhook.tenant.client_key.clone(), id));
        if let Some(key) = &key {
            // Claimed atomically, so two concurrent attempts of one delivery queue it once.
            if !self.seen.entry(key.clone()).or_insert(()).is_fresh() {
                return Ok(Delivery::Duplicate);
            }
        }
        let refused = |error| {
            if let Some(key) = &key {
                self.seen.invalidate(key);
            }
            Err(error)
        };
        let Some(place) = QueuePlace::take(&self.waiting, &webhook.tenant.client_key, self.share)
        else {
            return refused(WebhookError::TenantShareFull { share: self.share });
        };
        match self.sender.try_send(Job {
            handler,
            webhook,
            _place: place,
        }) {
            Ok(()) => Ok(Delivery::Accepted),
            Err(_) => refused(WebhookError::QueueFull {
                capacity: self.capacity,
            }),
        }
    }
}

/// One worker: takes the next delivery and runs its handler to the end. Each handler runs as a
/// task of its own, so one that panics is logged and does not take the worker with it.
async fn work(receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let next = receiver.lock().await.recv().await;
        let Some(Job {
            handler,
            webhook,
            _place: place,
        }) = next
        else {
            return;
        };
        // Taken out of the queue: no longer counted against its tenant's share.
        drop(place);
        let event = webhook.event.clone();
        let client_key = webhook.tenant.client_key.clone();
        match tokio::spawn(handler(webhook)).await {
            Ok(Ok(())) => tracing::debug!(%event, %client_key, "webhook handled"),
            Ok(Err(error)) => {
                tracing::error!(%event, %client_key, error = %format!("{error:#}"), "webhook handler failed")
            }
            Err(panic) => {
                tracing::error!(%event, %client_key, error = %panic, "webhook handler panicked")
            }
        }
    }
}

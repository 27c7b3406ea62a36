//! Tracing set-up. Request spans carry method, path and status, never the query string (it
//! may hold `?jwt=`) nor any header; secrets are redacted types, so no log line holds one.

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage as _;
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// `RUST_LOG` wins; otherwise `default_filter` (e.g. `info`).
pub fn env_filter(default_filter: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter))
}

/// Installs the global subscriber: text lines, or JSON lines with `WARDEN_LOG_FORMAT=json`.
pub fn init(default_filter: &str) {
    let json = std::env::var("WARDEN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    install(env_filter(default_filter), json, ansi, std::io::stderr);
}

/// Like [`init`] with an explicit filter and sink (tests capture logs this way).
pub fn init_with_writer<W>(filter: EnvFilter, json: bool, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    install(filter, json, false, writer);
}

fn install<W>(filter: EnvFilter, json: bool, ansi: bool, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .with_span_events(FmtSpan::CLOSE)
        .with_target(true);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// The request span of `tracing-actix-web`, minus the query string, client address and
/// user agent that its default span records. Its close is the one access-log line of a
/// request; a refusal adds its reason to that line (`error`) rather than a line of its own.
pub struct RedactingRootSpan;

impl RootSpanBuilder for RedactingRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = RequestId::of(request);
        request.extensions_mut().insert(request_id.clone());
        tracing::info_span!(
            "http_request",
            request_id = %request_id.0,
            method = %request.method(),
            path = %request.path(),
            status = tracing::field::Empty,
            error = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(response) => response.status().as_u16(),
            Err(error) => error.as_response_error().status_code().as_u16(),
        };
        span.record("status", status);
    }
}

/// The header that names a request, end to end: honoured when a proxy or the caller sends a
/// sane one, generated otherwise, and always answered.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `X-Request-Id` honoured; a longer one is replaced.
const MAX_REQUEST_ID_CHARS: usize = 128;

tokio::task_local! {
    static CURRENT_REQUEST_ID: RequestId;
}

/// The id of one request, on its log line, in its `X-Request-Id` answer header and in its
/// error body, so a vendor can match a customer's report to the log.
#[derive(Debug, Clone)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// The caller's `X-Request-Id` when it is short and plain (letters, digits, `-_.:`, so it
    /// cannot forge a log line); a new UUID otherwise.
    fn of(request: &ServiceRequest) -> Self {
        let sent = request
            .headers()
            .get(&REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_REQUEST_ID_CHARS
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            });
        match sent {
            Some(id) => Self(id.into()),
            None => Self(uuid::Uuid::new_v4().to_string().into()),
        }
    }

    /// The id of the request being answered, if any.
    pub fn current() -> Option<String> {
        CURRENT_REQUEST_ID.try_with(|id| id.0.to_string()).ok()
    }
}

/// Makes the request's id (set by [`RedactingRootSpan`], which must wrap this) current while
/// the request is handled, and answers it in `X-Request-Id`.
pub async fn request_id_scope(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = request
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(|| RequestId::of(&request));
    let header = HeaderValue::from_str(&id.0).ok();
    let mut response = CURRENT_REQUEST_ID.scope(id, next.call(request)).await?;
    if let Some(value) = header {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    Ok(response)
}

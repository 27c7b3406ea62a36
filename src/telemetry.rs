//! Tracing set-up. Request spans carry method, path and status, never the query string (it
//! may hold `?jwt=`) nor any header; secrets are redacted types, so no log line holds one.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
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
        tracing::info_span!(
            "http_request",
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

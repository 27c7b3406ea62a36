//! Time limits on what a client sends, on every route (docs/PROTOCOL.md §14): the headers
//! within `WARDEN_HEADER_TIMEOUT_SECONDS` (actix's `client_request_timeout`, set in
//! [`crate::startup`]) and the body within `WARDEN_BODY_TIMEOUT_SECONDS` of the headers
//! ([`body_deadline`]). A client trickling its bytes cannot hold a worker's connection open
//! for as long as it likes.

use std::cell::Cell;
use std::future::Future as _;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpMessage as _, ResponseError as _};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::startup::AppState;

/// Middleware: a request whose body has not arrived in full within the body timeout is
/// answered `408` ([`ApiError::BodyTimeout`]), whatever the handler made of the failed read,
/// and its connection is closed. The handler only ever saw an incomplete body, so nothing it
/// could store came from it. A handler that does not read the body is never timed out by it.
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map(|state| state.settings.body_timeout);
    let payload = req.take_payload();
    let limit = match limit {
        Some(limit) if !matches!(payload, Payload::None) => limit,
        _ => {
            req.set_payload(payload);
            return next
                .call(req)
                .await
                .map(ServiceResponse::map_into_left_body);
        }
    };
    let expired = Rc::new(Cell::new(false));
    req.set_payload(Payload::Stream {
        payload: Box::pin(TimedBody {
            inner: payload,
            limit,
            deadline: Instant::now() + limit,
            timer: None,
            finished: false,
            expired: expired.clone(),
        }),
    });
    let outcome = next.call(req).await;
    if !expired.get() {
        return outcome.map(ServiceResponse::map_into_left_body);
    }
    let timed_out = ApiError::BodyTimeout {
        seconds: limit.as_secs(),
    };
    // The request goes back with the answer (it cannot be cloned before routing).
    let Ok(handled) = outcome else {
        return Err(timed_out.into());
    };
    let (request, _) = handled.into_parts();
    let mut response = timed_out.error_response();
    // The rest of the body may still be on its way: this connection serves nothing more.
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    Ok(ServiceResponse::new(request, response).map_into_right_body())
}

/// The request body, failing once its deadline has passed.
struct TimedBody {
    inner: Payload,
    limit: Duration,
    deadline: Instant,
    /// Armed at the first poll: a body that is read at once costs no timer registration.
    timer: Option<Pin<Box<Sleep>>>,
    /// The whole body arrived in time: the deadline no longer matters.
    finished: bool,
    /// Tells [`body_deadline`] that the deadline, not the client, ended the body.
    expired: Rc<Cell<bool>>,
}

impl Stream for TimedBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if this.expired.get() || timer.as_mut().poll(cx).is_ready() {
            this.expired.set(true);
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the request body was not received within {} s",
                    this.limit.as_secs()
                ),
            )))));
        }
        let next = Pin::new(&mut this.inner).poll_next(cx);
        this.finished = matches!(next, Poll::Ready(None));
        next
    }
}

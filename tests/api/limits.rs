//! Limits on what a client sends (docs/PROTOCOL.md §14), from a raw TCP client that sends
//! exactly the bytes it wants, when it wants: a body trickled past its deadline is `408` and
//! stores nothing, headers never finished cost a closed connection, a `baseUrl` past the
//! field limit is `400` and stores nothing, and an ordinary request is untouched.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::helpers::app::{both_stores, error_of, spawn_app_with, Backend, Options, Site, TestApp};

/// An app whose clients get `seconds` for their headers and `seconds` for their body.
async fn app_with_timeouts(backend: Backend, seconds: u64) -> TestApp {
    spawn_app_with(
        Options::new(backend)
            .set("WARDEN_HEADER_TIMEOUT_SECONDS", seconds.to_string())
            .set("WARDEN_BODY_TIMEOUT_SECONDS", seconds.to_string()),
    )
    .await
}

async fn connect(app: &TestApp) -> TcpStream {
    let authority = app
        .address
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("the app listens on http://host:port");
    TcpStream::connect(authority).await.expect("app accepts")
}

/// The head of `POST <path>` with a JSON body of `length` bytes and an install token.
fn post_head(app: &TestApp, path: &str, token: &str, length: usize) -> String {
    format!(
        "POST {}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Authorization: JWT {token}\r\nContent-Length: {length}\r\n\r\n",
        app.base_path
    )
}

/// Everything the server sends until it closes the connection (or `within` passes: then
/// `None`).
async fn read_until_closed(stream: &mut OwnedReadHalf, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

/// Starts a signed `installed` of `site` on a raw connection: the head is sent, the body is
/// left to the caller. Returns the token, the body and both halves of the connection.
async fn start_install(
    app: &TestApp,
    site: &Site,
) -> (String, Vec<u8>, OwnedReadHalf, OwnedWriteHalf) {
    let token = app.install_token(&site.client_key, "/installed");
    let body = serde_json::to_vec(&site.body("installed")).unwrap();
    let (reader, mut writer) = connect(app).await.into_split();
    writer
        .write_all(post_head(app, "/installed", &token, body.len()).as_bytes())
        .await
        .unwrap();
    (token, body, reader, writer)
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_its_deadline_is_408_and_stores_nothing() {
    let app = app_with_timeouts(Backend::Redis, 1).await;
    let site = Site::new();
    let (token, body, mut reader, mut writer) = start_install(&app, &site).await;
    let trickle = {
        let body = body.clone();
        tokio::spawn(async move {
            // One byte a second: the whole body would take minutes.
            for byte in body {
                if writer.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let started = Instant::now();
    let response = read_until_closed(&mut reader, Duration::from_secs(15))
        .await
        .expect("the server ends a trickled body within a few seconds");
    trickle.abort();
    assert_eq!(status_of(&response), Some(408), "{response}");
    assert!(
        response.contains(r#""error":"the request body was not received within 1 s""#),
        "{response}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered only after {:?}",
        started.elapsed()
    );
    assert!(app.stored(&site.client_key).await.is_none());

    // The same token and body, sent at once, install: what was refused was only the pace.
    let response = app.post_raw("/installed", Some(&token), body).await;
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
    assert!(app.stored(&site.client_key).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_never_finished_get_the_connection_closed() {
    let app = app_with_timeouts(Backend::Embedded, 1).await;
    let (mut reader, mut writer) = connect(&app).await.into_split();
    // No blank line: the head never ends.
    writer
        .write_all(
            b"POST /installed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let response = read_until_closed(&mut reader, Duration::from_secs(15))
        .await
        .expect("the server closes a connection whose headers never end");
    // Within the 1 s setting (and its timer's granularity), not actix's default of 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed only after {:?}",
        started.elapsed()
    );
    assert!(
        response.is_empty() || status_of(&response) == Some(408),
        "{response}"
    );
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_request_is_untouched_by_the_timeouts() {
    let app = app_with_timeouts(Backend::Embedded, 2).await;
    let site = Site::new();
    let (_, body, mut reader, mut writer) = start_install(&app, &site).await;
    // In two parts, a moment apart, well within the deadline.
    let (first, second) = body.split_at(body.len() / 2);
    writer.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.write_all(second).await.unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    let response = String::from_utf8_lossy(&head[..n]).into_owned();
    assert_eq!(status_of(&response), Some(204), "{response}");
    assert!(app.stored(&site.client_key).await.is_some());
    // A product request on the same app, through the ordinary client.
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

async fn a_long_base_url_is_refused_and_stores_nothing(backend: Backend) {
    let app = crate::helpers::app::spawn_app(backend).await;
    let site = Site::new();
    let long = format!("{}/{}", site.base_url, "a".repeat(60 * 1024));
    let mut body = site.body("installed");
    body["baseUrl"] = serde_json::json!(long);
    body["displayUrl"] = serde_json::json!(site.base_url);
    let token = app.install_token(&site.client_key, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error, "baseUrl is longer than 2048 characters");
    assert!(app.stored(&site.client_key).await.is_none());
    assert_eq!(app.stored_count().await, 0);
    if backend == Backend::Redis {
        let prefix = &app.state().settings.redis_prefix;
        let mut redis = redis::Client::open(crate::helpers::redis_server::redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(keys.is_empty(), "keys created: {keys:?}");
    }
}

both_stores!(a_long_base_url_is_refused_and_stores_nothing);

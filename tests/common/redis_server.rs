//! A private `redis-server` for the tests of one test binary: started on first use on a free
//! loopback port, with its own temporary directory, and stopped when the test process exits
//! (the wrapper shell kills it when its stdin, held by this process, closes).
//! The machine's own Redis on 6379 is never touched.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub url: String,
    pub port: u16,
    // Never dropped: closing its stdin at process exit is what stops the server.
    _child: Mutex<Child>,
}

static SERVER: OnceLock<RedisServer> = OnceLock::new();
static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// URL of this binary's private Redis, starting it on first call.
pub fn redis_url() -> &'static str {
    &server().url
}

pub fn server() -> &'static RedisServer {
    SERVER.get_or_init(|| {
        let mut last_error = String::new();
        for _ in 0..3 {
            match start() {
                Ok(s) => return s,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a private redis-server (is the redis-server package installed? scripts/test installs it): {last_error}");
    })
}

/// A key prefix no other test of this run uses, so tests share the server without sharing data.
pub fn unique_prefix() -> String {
    format!(
        "t{}x{}",
        std::process::id(),
        PREFIXES.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Result<RedisServer, String> {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("warden-test-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let script = r#"redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$2" --logfile "$2/redis.log" &
pid=$!
cat >/dev/null
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$2""#;
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(port.to_string())
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ping(port) {
            return Ok(RedisServer {
                url: format!("redis://127.0.0.1:{port}"),
                port,
                _child: Mutex::new(child),
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!(
        "redis-server on port {port} did not answer PING within 10 s"
    ))
}

fn ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

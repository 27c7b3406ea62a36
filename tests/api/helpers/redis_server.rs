//! A private `redis-server` for the tests of one test binary: started on first use on a free
//! loopback port, with its own temporary directory, and stopped when the test process exits
//! (the wrapper shell kills it when its stdin, held by this process, closes).
//! The machine's own Redis on 6379 is never touched.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{free_port, free_ports};

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

/// A private Redis Cluster of three primaries (no replicas) for the tests of one test binary:
/// started on first use on free loopback ports, stopped when the test process exits (as
/// [`server`]'s: the wrapper shell stops every node when its stdin closes).
pub struct RedisCluster {
    /// `redis://127.0.0.1:PORT` of every node.
    pub urls: Vec<String>,
    // Never dropped: closing its stdin at process exit is what stops the nodes.
    _child: Mutex<Child>,
}

static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();

/// This binary's private Redis Cluster, starting it on first call.
pub fn cluster() -> &'static RedisCluster {
    CLUSTER.get_or_init(|| {
        let mut last_error = String::new();
        for _ in 0..2 {
            match start_cluster() {
                Ok(c) => return c,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a private Redis Cluster (redis-server and redis-cli must be installed): {last_error}");
    })
}

fn start_cluster() -> Result<RedisCluster, String> {
    // A data port and a cluster-bus port per node.
    let all = free_ports(6);
    let (ports, bus_ports) = all.split_at(3);
    let dir = std::env::temp_dir().join(format!(
        "warden-test-redis-cluster-{}-{}",
        std::process::id(),
        ports[0]
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // $1: the directory, then pairs of port and bus port.
    let script = r#"dir="$1"; shift
pids=""
while [ $# -gt 0 ]; do
  redis-server --port "$1" --cluster-port "$2" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/nodes-$1.conf" --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis-$1.log" &
  pids="$pids $!"
  shift 2
done
cat >/dev/null
kill $pids 2>/dev/null
wait $pids 2>/dev/null
rm -rf "$dir""#;
    let mut command = Command::new("sh");
    command.arg("-c").arg(script).arg("sh").arg(&dir);
    for (port, bus) in ports.iter().zip(bus_ports) {
        command.arg(port.to_string()).arg(bus.to_string());
    }
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    // From here on, a failure drops `child`, closing its stdin: the nodes stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ports.iter().all(|p| ping(*p)) {
        if Instant::now() > deadline {
            return Err(format!(
                "the cluster nodes on {ports:?} did not answer PING within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ports.iter().all(|p| cluster_state_ok(*p)) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the cluster on {ports:?} did not reach cluster_state:ok within 15 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(RedisCluster {
        urls: ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect(),
        _child: Mutex::new(child),
    })
}

/// Whether the node on `port` says `cluster_state:ok` and knows every slot and three nodes.
fn cluster_state_ok(port: u16) -> bool {
    let Ok(output) = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "cluster",
            "info",
        ])
        .stdin(Stdio::null())
        .output()
    else {
        return false;
    };
    let info = String::from_utf8_lossy(&output.stdout);
    info.lines().any(|l| l.trim() == "cluster_state:ok")
        && info.lines().any(|l| l.trim() == "cluster_slots_ok:16384")
        && info.lines().any(|l| l.trim() == "cluster_known_nodes:3")
        && all_links_connected(port)
}

/// Whether this node's cluster-bus links to every other node are up: until they are, a
/// `PUBLISH` on this node is not forwarded to the nodes it has no link to yet.
fn all_links_connected(port: u16) -> bool {
    let Ok(output) = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "cluster",
            "nodes",
        ])
        .stdin(Stdio::null())
        .output()
    else {
        return false;
    };
    let nodes = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = nodes.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.len() == 3 && lines.iter().all(|l| l.contains(" connected"))
}

/// A `redis-server` owned by one test, which may kill it (`SIGKILL`, as a crash) and start it
/// again on the same port with the same data: an append-only file synced on every write, so a
/// kill loses nothing. Each incarnation runs under a wrapper shell, as [`server`]'s does, which
/// stops it when its stdin closes (this value dropped, or the test process gone).
pub struct OwnRedis {
    pub url: String,
    pub port: u16,
    dir: tempfile::TempDir,
    running: Option<Incarnation>,
}

struct Incarnation {
    /// The wrapper shell; its stdin is what keeps the server up.
    wrapper: Child,
    /// The `redis-server` process itself, as the wrapper reported it.
    pid: u32,
}

impl OwnRedis {
    /// Starts a new server on a free loopback port.
    pub fn start() -> Self {
        let mut redis = Self {
            url: String::new(),
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            running: None,
        };
        redis.url = format!("redis://127.0.0.1:{}", redis.port);
        redis.restart();
        redis
    }

    /// Kills the server with `SIGKILL` and waits until it is gone: every connection to it is
    /// reset, nothing answers on its port.
    pub fn kill(&mut self) {
        let Some(mut incarnation) = self.running.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-KILL", &incarnation.pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL {} failed", incarnation.pid);
        // Closing its stdin lets the wrapper reap the server and exit.
        drop(incarnation.wrapper.stdin.take());
        let _ = incarnation.wrapper.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server still answers after kill"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same port and data; returns once it answers `PING`.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "the server is running");
        let script = r#"redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always --dir "$2" --logfile "$2/redis.log" &
pid=$!
echo "$pid"
cat >/dev/null
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null"#;
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(wrapper.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid = line.trim().parse().expect("the wrapper reports the pid");
        // From here on, a failure drops the incarnation with `self`: the server stops.
        self.running = Some(Incarnation { wrapper, pid });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s; its log:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut incarnation) = self.running.take() {
            drop(incarnation.wrapper.stdin.take());
            let _ = incarnation.wrapper.wait();
        }
    }
}

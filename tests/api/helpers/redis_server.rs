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
    cluster_create(ports, 0)?;
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

/// `redis-cli --cluster create` of the nodes on `ports`, `replicas` per primary.
fn cluster_create(ports: &[u16], replicas: u8) -> Result<(), String> {
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
    Ok(())
}

/// Whether the node on `port` says `cluster_state:ok` and knows every slot and three nodes.
fn cluster_state_ok(port: u16) -> bool {
    let info = redis_cli(port, &["cluster", "info"]);
    info.lines().any(|l| l.trim() == "cluster_state:ok")
        && info.lines().any(|l| l.trim() == "cluster_slots_ok:16384")
        && info.lines().any(|l| l.trim() == "cluster_known_nodes:3")
        && all_links_connected(port)
}

/// Whether this node's cluster-bus links to every other node are up: until they are, a
/// `PUBLISH` on this node is not forwarded to the nodes it has no link to yet.
fn all_links_connected(port: u16) -> bool {
    let nodes = redis_cli(port, &["cluster", "nodes"]);
    let lines: Vec<&str> = nodes.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.len() == 3 && lines.iter().all(|l| l.contains(" connected"))
}

/// Runs `script` under `sh` with `args`; the script starts a server, prints its pid on the
/// first line of its output, and stops it when its stdin closes. Returns the wrapper and the pid.
fn spawn_wrapper(script: &str, args: &[&std::ffi::OsStr]) -> (Child, u32) {
    let mut wrapper = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
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
    (wrapper, pid)
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
        let port = self.port.to_string();
        let (wrapper, pid) = spawn_wrapper(script, &[port.as_ref(), self.dir.path().as_os_str()]);
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

/// One `redis-server` process that a test may kill (`kill -9`) and start again on the same
/// port and directory; stopped when dropped or when the test process exits (its wrapper shell
/// kills it when its stdin closes).
pub struct RedisNode {
    pub port: u16,
    pub url: String,
    dir: std::path::PathBuf,
    args: Vec<String>,
    pid: u32,
    _child: Child,
}

impl RedisNode {
    /// Starts `redis-server` on `port` with its files in `dir` and `args` added; returns once
    /// it answers `PING`.
    pub fn start(port: u16, dir: &std::path::Path, args: &[String]) -> RedisNode {
        std::fs::create_dir_all(dir).unwrap();
        // Prints the server's pid, then kills it when stdin closes.
        let script = r#"port="$1"; dir="$2"; shift 2
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --logfile "$dir/redis-$port.log" "$@" &
pid=$!
echo "$pid"
cat >/dev/null
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null"#;
        let port_arg = port.to_string();
        let mut wrapper_args: Vec<&std::ffi::OsStr> = vec![port_arg.as_ref(), dir.as_os_str()];
        wrapper_args.extend(args.iter().map(|a| std::ffi::OsStr::new(a.as_str())));
        let (child, pid) = spawn_wrapper(script, &wrapper_args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        RedisNode {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir: dir.to_owned(),
            args: args.to_vec(),
            pid,
            _child: child,
        }
    }

    /// `kill -9` of the server: it dies without a word to anybody.
    pub fn kill9(&self) {
        let status = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} survived kill -9",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again (same port, directory and arguments) after [`kill9`](Self::kill9).
    pub fn restart(&mut self) {
        *self = RedisNode::start(self.port, &self.dir.clone(), &self.args.clone());
    }

    /// `redis-cli -p PORT args...`, its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

/// `redis-cli -h 127.0.0.1 -p port args...`: its standard output ("" if it cannot run).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A private primary and one replica (`--replicaof`), for one test.
pub struct ReplicatedRedis {
    pub primary: RedisNode,
    pub replica: RedisNode,
    _dir: tempfile::TempDir,
}

impl ReplicatedRedis {
    /// Returns once the replica is in sync with the primary.
    pub fn start() -> ReplicatedRedis {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2);
        let primary = RedisNode::start(ports[0], &dir.path().join("primary"), &[]);
        let replica = RedisNode::start(
            ports[1],
            &dir.path().join("replica"),
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                ports[0].to_string(),
            ],
        );
        let set = ReplicatedRedis {
            primary,
            replica,
            _dir: dir,
        };
        set.await_replica_in_sync();
        set
    }

    /// Waits (at most 15 s) until the primary counts one online replica.
    pub fn await_replica_in_sync(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let info = self.primary.cli(&["info", "replication"]);
            if info.lines().any(|l| l.trim() == "connected_slaves:1")
                && info.contains("state=online")
                && self
                    .replica
                    .cli(&["info", "replication"])
                    .contains("master_link_status:up")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not sync within 15 s: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A private Redis Cluster of three primaries, each with one replica, for one test.
pub struct ReplicatedCluster {
    pub nodes: Vec<RedisNode>,
    _dir: tempfile::TempDir,
}

impl ReplicatedCluster {
    pub fn start() -> ReplicatedCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(12);
        let (ports, bus_ports) = ports.split_at(6);
        let nodes: Vec<RedisNode> = ports
            .iter()
            .zip(bus_ports)
            .map(|(port, bus)| {
                RedisNode::start(
                    *port,
                    &dir.path().join(port.to_string()),
                    &[
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-port".into(),
                        bus.to_string(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        // A dead node is noticed within seconds, not the default 15.
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                    ],
                )
            })
            .collect();
        if let Err(e) = cluster_create(ports, 1) {
            panic!("{e}");
        }
        let cluster = ReplicatedCluster { nodes, _dir: dir };
        cluster.await_healthy(Duration::from_secs(20));
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// Every live node's view, from `CLUSTER NODES` of `node`: (port, is primary, primary's id
    /// or "-", own id, flags).
    fn view(node: &RedisNode) -> Vec<(u16, bool, String, String, String)> {
        node.cli(&["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?;
                Some((
                    port.parse().ok()?,
                    f.get(2)?.split(',').any(|x| x == "master"),
                    f.get(3)?.to_string(),
                    f.first()?.to_string(),
                    f.get(2)?.to_string(),
                ))
            })
            .collect()
    }

    /// The node serving `port`.
    pub fn node(&self, port: u16) -> &RedisNode {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }

    /// A primary's port and its replica's port (from the first node's view).
    pub fn primary_and_replica(&self) -> (u16, u16) {
        let view = Self::view(&self.nodes[0]);
        for (port, primary, _, id, _) in &view {
            if *primary {
                if let Some((replica, ..)) = view.iter().find(|(_, p, of, ..)| !p && of == id) {
                    return (*port, *replica);
                }
            }
        }
        panic!("no primary with a replica in {view:?}");
    }

    /// Waits until every node says `cluster_state:ok` and sees three primaries, each with a
    /// replica whose link is up and in sync.
    pub fn await_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy within {within:?}: {}",
                self.nodes[0].cli(&["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn healthy(&self) -> bool {
        for node in &self.nodes {
            let info = node.cli(&["cluster", "info"]);
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return false;
            }
            let view = Self::view(node);
            let ok = view.len() == 6
                && view.iter().filter(|v| v.1).count() == 3
                && view.iter().all(|v| !v.4.contains("fail"));
            if !ok {
                return false;
            }
            let replication = node.cli(&["info", "replication"]);
            if replication.contains("role:master") {
                if !replication.contains("state=online") {
                    return false;
                }
            } else if !replication.contains("master_link_status:up") {
                return false;
            }
        }
        true
    }
}

//! Opaque TCP through the mesh, with real servers and clients from Debian's packages: Redis
//! (`redis-server`, `redis-cli`, `redis-benchmark`) behind its sidecar, reached through a
//! caller's sidecar over mesh mTLS. Istio's TCP metrics count exactly the bytes that moved, on
//! both sides, with the source named on the server's side; a TCP AuthorizationPolicy closes the
//! connection.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::mesh::*;
use support::*;

const MESH: &str = r#"apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  selector: {app: redis}
  ports: [{name: tcp-redis, port: 6379}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: redis, labels: {app: redis}}
spec:
  command: [sh, -c, "exec redis-server --port $PORT --bind 127.0.0.1 --save '' --appendonly no"]
---
apiVersion: v1
kind: Service
metadata: {name: caller}
spec:
  selector: {app: caller}
  ports: [{name: http, port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: caller, labels: {app: caller}}
spec:
  command: [trellis-demo, colorteller]
  env: {COLOR: blue}
  upstreams: [redis]
"#;

/// The caller's sidecar port bound to `redis` (what the caller app gets as `REDIS_ADDR`).
fn redis_port_of_caller(up: &Up) -> SocketAddr {
    let out = Command::new(trellis_bin())
        .args(["proxy-config", "caller", "-o", "json", "--control-plane", &up.cp.to_string()])
        .output()
        .expect("proxy-config");
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("proxy-config json");
    let l = snap["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"].as_str().is_some_and(|n| n.starts_with("upstream")))
        .unwrap_or_else(|| panic!("no upstream listener: {snap}"));
    assert!(l["routing"]["tcp"].is_object(), "the redis port is proxied as TCP: {l}");
    l["address"].as_str().expect("address").parse().expect("addr")
}

fn redis_cli(at: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", &at.ip().to_string(), "-p", &at.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli (Debian redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `SET big <n bytes>` then `GET big` over one connection: the bytes written and read.
async fn set_and_get(at: SocketAddr, n: usize) -> (u64, u64) {
    let mut s = tokio::net::TcpStream::connect(at).await.expect("connect");
    let value: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${n}\r\n").into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    let get = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n";
    s.write_all(&set).await.expect("write SET");
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).await.expect("read +OK");
    assert_eq!(&ok, b"+OK\r\n");
    s.write_all(get).await.expect("write GET");
    let head = format!("${n}\r\n");
    let mut reply = vec![0u8; head.len() + n + 2];
    s.read_exact(&mut reply).await.expect("read the value");
    assert_eq!(&reply[..head.len()], head.as_bytes());
    assert_eq!(&reply[head.len()..head.len() + n], &value[..], "the value comes back whole");
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("read to the end");
    ((set.len() + get.len()) as u64, (ok.len() + reply.len() + rest.len()) as u64)
}

/// The TCP counters of one side for connections to the redis service.
async fn tcp_counters(admin: SocketAddr, reporter: &str) -> [f64; 4] {
    let m = metrics(admin).await;
    let f = [("reporter", reporter), ("destination_service_name", "redis")];
    [
        metric_sum(&m, "istio_tcp_received_bytes_total", &f),
        metric_sum(&m, "istio_tcp_sent_bytes_total", &f),
        metric_sum(&m, "istio_tcp_connections_opened_total", &f),
        metric_sum(&m, "istio_tcp_connections_closed_total", &f),
    ]
}

/// Waits until every connection counted as opened on that side is counted as closed.
async fn settled(admin: SocketAddr, reporter: &str) -> [f64; 4] {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = tcp_counters(admin, reporter).await;
        if c[2] > 0.0 && c[2] == c[3] {
            return c;
        }
        assert!(Instant::now() < deadline, "{reporter}: connections not all closed: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /metrics
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_two_sidecars_over_mtls_counts_every_byte_and_obeys_authorization() {
    let dir = ConfigDir::new();
    dir.write("mesh.yaml", MESH);
    let up = Up::start_with(dir.path(), free_port(), &[]).await;
    let at = redis_port_of_caller(&up);
    let admins = up.admins();
    let (caller, redis) = (admins["caller"], admins["redis"]);

    // Correct results through the mesh.
    assert_eq!(redis_cli(at, &["SET", "greeting", "hello"]), "OK");
    assert_eq!(redis_cli(at, &["GET", "greeting"]), "hello");
    let before = (settled(caller, "source").await, settled(redis, "destination").await);

    // The byte counters equal the bytes this connection moved, on both sides.
    let (wrote, read) = set_and_get(at, 200_000).await;
    let after = (settled(caller, "source").await, settled(redis, "destination").await);
    for (side, b, a) in [("source", before.0, after.0), ("destination", before.1, after.1)] {
        assert_eq!(a[0] - b[0], wrote as f64, "{side}: received bytes = bytes the client wrote");
        assert_eq!(a[1] - b[1], read as f64, "{side}: sent bytes = bytes the client read");
        assert_eq!(a[2] - b[2], 1.0, "{side}: one connection opened");
    }
    let m = metrics(redis).await;
    assert!(
        metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "caller"),
                ("destination_workload", "redis"),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", "spiffe://cluster.local/ns/default/sa/caller")
            ]
        ) >= 1.0,
        "the server side names the source workload and its mTLS identity:\n{m}"
    );

    // redis-benchmark through the mesh.
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &at.port().to_string(), "-n", "2000", "-c", "4", "-t", "set,get", "-q"])
        .output()
        .expect("redis-benchmark (Debian redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("SET:") && text.contains("GET:"), "{text}");
    println!("redis-benchmark through two sidecars:\n{text}");

    // A TCP AuthorizationPolicy denying the caller closes its connections before Redis sees them.
    let deny = dir.write(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-caller}\nspec:\n  selector: {matchLabels: {app: redis}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/caller]}}]\n",
    );
    let (ok, out, err) = up.trellis(&["apply", "-f", deny.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    let mut s = tokio::net::TcpStream::connect(at).await.expect("connect");
    let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("closed within 10 s");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "no answer from Redis: {:?}",
        n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    let m = metrics(redis).await;
    assert!(
        metric_sum(
            &m,
            "trellis_proxy_authz_decisions_total",
            &[("decision", "deny"), ("policy", "default/deny-caller")]
        ) >= 1.0,
        "the denial is counted:\n{m}"
    );
}

/// The caller's sidecar port bound to `service`, by the host its listener routes to.
fn caller_port_for(up: &Up, service: &str) -> (SocketAddr, serde_json::Value) {
    let out = Command::new(trellis_bin())
        .args(["proxy-config", "caller", "-o", "json", "--control-plane", &up.cp.to_string()])
        .output()
        .expect("proxy-config");
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("proxy-config json");
    let l = snap["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| {
            let r = l["routing"].to_string();
            r.contains(&format!("\"host\":\"{service}\"")) || r.contains(&format!("||{service}."))
        })
        .unwrap_or_else(|| panic!("no listener for {service}: {snap}"))
        .clone();
    (l["address"].as_str().expect("address").parse().expect("addr"), l["routing"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_port_serves_http_as_http_and_a_server_first_protocol_without_stalling() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tcp/server_first.py");
    let dir = ConfigDir::new();
    // Port names that declare no protocol (`db`, `web`): detected per connection.
    dir.write(
        "mesh.yaml",
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: greeter}}
spec:
  selector: {{app: greeter}}
  ports: [{{name: db, port: 5000}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: greeter, labels: {{app: greeter}}}}
spec:
  command: [python3, {script}]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: web, port: 8000}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: web, labels: {{app: web}}}}
spec:
  command: [trellis-demo, colorteller]
  env: {{COLOR: blue}}
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: caller, labels: {{app: caller}}}}
spec:
  command: [trellis-demo, colorteller]
  env: {{COLOR: red}}
  upstreams: [greeter, web]
"#,
            script = script.display()
        ),
    );
    let up = Up::start_with(dir.path(), free_port(), &[]).await;
    let (greeter, routing) = caller_port_for(&up, "greeter");
    assert!(routing["detect"].is_object(), "an undeclared port is detected: {routing}");
    let (web, _) = caller_port_for(&up, "web");

    // The server speaks first: its greeting comes through two sidecars (mTLS) while the client
    // says nothing. The bound is a liveness bound (a proxy waiting for the client would stall
    // here forever); the time it took is printed, not asserted.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let started = Instant::now();
    let s = tokio::net::TcpStream::connect(greeter).await.expect("connect");
    let mut s = tokio::io::BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
        .await
        .expect("the greeting arrives while the client is silent")
        .expect("read");
    println!("server-first greeting through two sidecars after {:?}", started.elapsed());
    if line != "220 greeter ready\r\n" {
        let (_, g, _) = up.trellis(&["logs", "greeter-proxy"]);
        let (_, c, _) = up.trellis(&["logs", "caller-proxy"]);
        let out = Command::new(trellis_bin())
            .args(["proxy-config", "greeter", "-o", "json", "--control-plane", &up.cp.to_string()])
            .output()
            .expect("proxy-config");
        panic!("got {line:?}\ngreeter:\n{g}\ncaller:\n{c}\n{}", String::from_utf8_lossy(&out.stdout));
    }
    s.get_mut().write_all(b"hello\n").await.expect("write");
    line.clear();
    s.read_line(&mut line).await.expect("echo");
    assert_eq!(line, "hello\n");
    drop(s);

    // HTTP on an undeclared port is served as HTTP (request metrics, not TCP ones).
    let r = get(&format!("http://{web}/color"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let caller = up.admins()["caller"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(caller).await;
        let http =
            metric_sum(&m, "istio_requests_total", &[("destination_service_name", "web"), ("reporter", "source")]);
        let tcp = metric_sum(
            &m,
            "istio_tcp_connections_closed_total",
            &[("destination_service_name", "greeter"), ("reporter", "source")],
        );
        if http >= 1.0 && tcp >= 1.0 {
            assert_eq!(
                metric_sum(&m, "istio_tcp_connections_opened_total", &[("destination_service_name", "web")]),
                0.0,
                "HTTP was detected as HTTP:\n{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "http {http}, tcp {tcp}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /metrics
    }
}

/// PostgreSQL from Debian's packages, as a mesh workload (its own data directory, run as the
/// `postgres` user when the test runs as root, which PostgreSQL refuses to run as).
const POSTGRES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: postgres}
spec:
  selector: {app: postgres}
  ports: [{name: tcp-postgres, port: 5432}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: postgres, labels: {app: postgres}}
spec:
  command:
  - sh
  - -c
  - |
    set -e
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    d=$(mktemp -d)
    run() { if [ "$(id -u)" = 0 ]; then chown -R postgres "$d"; runuser -u postgres -- "$@"; else "$@"; fi; }
    run "$bin/initdb" -D "$d/data" -A trust -U postgres >/dev/null
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$d"; exec runuser -u postgres -- "$bin/postgres" -D "$d/data" -p "$PORT" -k "$d" -c listen_addresses=127.0.0.1 -c fsync=off; fi
    exec "$bin/postgres" -D "$d/data" -p "$PORT" -k "$d" -c listen_addresses=127.0.0.1 -c fsync=off
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: caller, labels: {app: caller}}
spec:
  command: [trellis-demo, colorteller]
  env: {COLOR: blue}
  upstreams: [postgres]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_psql_and_pgbench_through_two_sidecars_over_mtls() {
    let dir = ConfigDir::new();
    dir.write("mesh.yaml", POSTGRES);
    let up = Up::start_with(dir.path(), free_port(), &[]).await;
    let (at, routing) = caller_port_for(&up, "postgres");
    assert!(routing["tcp"].is_object(), "tcp-postgres is proxied as TCP: {routing}");
    let (host, port) = (at.ip().to_string(), at.port().to_string());
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args(["-h", &host, "-p", &port, "-U", "postgres", "-d", "postgres", "-tAc", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql (Debian postgresql-client)");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    psql("CREATE TABLE greetings (id serial PRIMARY KEY, message text)");
    psql("INSERT INTO greetings (message) VALUES ('Shalom (שָׁלוֹם), from Service D!')");
    assert_eq!(psql("SELECT message FROM greetings"), "Shalom (שָׁלוֹם), from Service D!");
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args(["-h", &host, "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .expect("pgbench (Debian postgresql-contrib)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    let run = pgbench(&["-c", "4", "-t", "200", "-n"]);
    assert!(run.contains("number of transactions actually processed: 800/800"), "{run}");
    println!("pgbench through two sidecars:\n{run}");
    let m = metrics(up.admins()["postgres"]).await;
    assert!(
        metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "caller"), ("connection_security_policy", "mutual_tls")]
        ) >= 5.0,
        "psql and pgbench connections, over mTLS, from the caller:\n{m}"
    );
}

//! The reference platform's asynchronous legs over Redis (a queue and a datastore in one
//! server): `LPUSH`/`LTRIM` to publish and store, `BRPOP` to consume, spoken in RESP2 over one
//! TCP connection at a time. Three commands do not justify a client library and its dependency
//! tree in a demo app; a connection that fails is opened again on the next use.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The list F consumes (D publishes to it).
pub const QUEUE: &str = "greetings:queue";
/// The list greetings are stored in (the newest first, the last 1000 kept).
pub const STORE: &str = "greetings";

/// A Redis server by address, with a connection opened on first use.
pub struct Redis {
    addr: String,
    conn: tokio::sync::Mutex<Option<BufReader<TcpStream>>>,
    /// When a failure was last logged (failures are logged at most every 30 s).
    last_error: std::sync::Mutex<Option<Instant>>,
}

/// A reply, as far as these commands need.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Ok,
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Redis {
    /// From `redis://host:port` (or a bare `host:port`) in `var`, else `fallback` (the address
    /// `trellis up` gives a workload for its `redis` upstream, `REDIS_ADDR`).
    pub fn from_env(var: &str, fallback: &str) -> Option<Redis> {
        let raw = std::env::var(var).or_else(|_| std::env::var(fallback)).ok()?;
        let addr = raw.trim_start_matches("redis://").trim_end_matches('/').to_string();
        (!addr.is_empty()).then(|| Redis {
            addr,
            conn: tokio::sync::Mutex::new(None),
            last_error: std::sync::Mutex::new(None),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether a failure should be logged now (at most every 30 s).
    pub fn should_log(&self) -> bool {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Sends one command and reads its reply; the connection is dropped on any error.
    pub async fn command(&self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = s.set_nodelay(true);
            *guard = Some(BufReader::new(s));
        }
        let conn = guard.as_mut().expect("connected");
        let result = async {
            conn.get_mut().write_all(&encode(args)).await?;
            read_reply(conn).await
        }
        .await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// `LPUSH key value` then `LTRIM key 0 keep-1`.
    pub async fn push(&self, key: &str, value: &[u8], keep: usize) -> std::io::Result<()> {
        self.command(&[b"LPUSH", key.as_bytes(), value]).await?;
        self.command(&[b"LTRIM", key.as_bytes(), b"0", (keep - 1).to_string().as_bytes()]).await?;
        Ok(())
    }

    /// `BRPOP key timeout`: the oldest message, or `None` after `timeout_s` seconds.
    pub async fn pop(&self, key: &str, timeout_s: u32) -> std::io::Result<Option<Vec<u8>>> {
        match self.command(&[b"BRPOP", key.as_bytes(), timeout_s.to_string().as_bytes()]).await? {
            Reply::Array(Some(mut items)) if items.len() == 2 => match items.pop() {
                Some(Reply::Bulk(v)) => Ok(v),
                _ => Err(bad("BRPOP reply")),
            },
            Reply::Array(None) | Reply::Bulk(None) => Ok(None),
            other => Err(bad(&format!("BRPOP reply {other:?}"))),
        }
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected {what}"))
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line.trim_end_matches("\r\n").to_string())
}

fn read_reply(
    r: &mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + '_>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at(if line.is_empty() { 0 } else { 1 });
        let n = || rest.parse::<i64>().map_err(|_| bad(&format!("reply {line:?}")));
        match kind {
            "+" => Ok(Reply::Ok),
            "-" => Err(std::io::Error::other(format!("redis: {rest}"))),
            ":" => Ok(Reply::Int(n()?)),
            "$" => {
                let len = n()?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut buf = vec![0u8; len as usize + 2];
                tokio::io::AsyncReadExt::read_exact(r, &mut buf).await?;
                buf.truncate(len as usize);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let len = n()?;
                if len < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(read_reply(r).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(bad(&format!("reply {line:?}"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"LPUSH", b"q", b"hi"]), b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$2\r\nhi\r\n");
    }
}

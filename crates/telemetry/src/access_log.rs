//! Access logs: one JSON line per request, written off the request path through a bounded
//! queue (a full queue drops the line and counts it), to stdout or a file.

use std::path::PathBuf;

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Where access logs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    pub fn parse(s: &str) -> Sink {
        match s {
            "stdout" | "-" | "/dev/stdout" => Sink::Stdout,
            path => Sink::File(PathBuf::from(path)),
        }
    }
}

const QUEUE: usize = 8192;

#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer task (on the current Tokio runtime).
    pub fn start(sink: Sink, dropped: Counter) -> std::io::Result<AccessLog> {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &sink {
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::File(p) => {
                Box::new(tokio::fs::File::from_std(std::fs::OpenOptions::new().create(true).append(true).open(p)?))
            }
        };
        let d = dropped.clone();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(line) = rx.recv().await {
                buf.push_str(&line);
                buf.push('\n');
                while let Ok(more) = rx.try_recv() {
                    buf.push_str(&more);
                    buf.push('\n');
                    if buf.len() > 64 * 1024 {
                        break;
                    }
                }
                if out.write_all(buf.as_bytes()).await.is_err() || out.flush().await.is_err() {
                    d.inc_by(buf.lines().count() as u64);
                }
                buf.clear();
            }
        });
        Ok(AccessLog { tx, dropped })
    }

    /// Queues one line; never waits.
    pub fn write(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

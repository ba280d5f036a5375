//! Access logs: one JSON line per request, written off the request path through a bounded
//! queue (a full queue drops the line and counts it), to stdout or a file, by a thread that
//! writes in batches every 50 ms and on shutdown.

use std::path::PathBuf;

use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

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

const QUEUE: usize = 16 * 1024;

/// How often the writer wakes to write what queued up. Requests never wake it: at thousands of
/// requests per second a wake-up per line would cost more than the line.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

enum Msg {
    Line(String),
    /// Write everything queued before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start(sink: Sink, dropped: Counter) -> std::io::Result<AccessLog> {
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let out: Box<dyn Write + Send> = match &sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let d = dropped.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || writer(rx, out, d))?;
        Ok(AccessLog { tx, dropped })
    }

    /// Queues one line; never waits.
    pub fn write(&self, line: String) {
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits (at most `timeout`) until every line queued so far is written: for shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let tx = self.tx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let (ack, done) = std::sync::mpsc::channel();
            if tx.send(Msg::Flush(ack)).is_ok() {
                let _ = done.recv_timeout(timeout);
            }
        })
        .await;
    }
}

fn writer(rx: Receiver<Msg>, out: Box<dyn Write + Send>, dropped: Counter) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let (mut lines, mut acks, mut closed) = (0u64, Vec::new(), false);
        let mut failed = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(l)) => {
                    lines += 1;
                    failed |= out.write_all(l.as_bytes()).and_then(|_| out.write_all(b"\n")).is_err();
                }
                Ok(Msg::Flush(a)) => acks.push(a),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if out.flush().is_err() || failed {
            dropped.inc_by(lines);
        }
        for a in acks {
            let _ = a.send(());
        }
        if closed {
            return;
        }
    }
}

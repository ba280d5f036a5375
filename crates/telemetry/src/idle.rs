//! Telemetry's own work (encoding and sending exports, a console's ingest of them) on threads
//! that run only on CPU that requests leave idle.
//!
//! Each such thread is Linux's `SCHED_IDLE`: the scheduler runs it only when no ordinary
//! thread wants that CPU, a request's thread that wakes takes the CPU from it at once, and a
//! CPU running only idle threads counts as free when a woken thread is placed. So the work
//! costs requests neither their CPU nor their latency, however it bursts (`bench console`:
//! without this, batches of spans arriving at the console five times a second doubled the
//! mesh's p99). What it costs instead: on a machine whose CPU is saturated, the work waits;
//! the queues in front of it fill and what does not fit is dropped and counted
//! (`trellis_proxy_spans_dropped_total`, `trellis_proxy_access_log_dropped_total`, the console's 503s), as
//! with any receiver that cannot keep up. Elsewhere than Linux the threads keep their normal
//! priority.

use std::future::Future;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use thread_priority::{
    set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
};

/// Puts the calling thread at `SCHED_IDLE` (nothing happens where that fails: the work then
/// runs at normal priority).
fn lower_this_thread() {
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let _ = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle);
}

/// Runs `task` to completion on a thread of its own, at idle priority, on a single-threaded
/// Tokio runtime (what it spawns, such as an HTTP client's connections, runs there too). The
/// thread ends when the task does.
pub fn spawn<F, T>(name: &str, task: F) -> std::io::Result<()>
where
    F: FnOnce() -> T + Send + 'static,
    T: Future<Output = ()>,
{
    std::thread::Builder::new().name(name.into()).spawn(move || {
        lower_this_thread();
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(task()),
            Err(e) => eprintln!("error: {e}: cannot start a runtime for telemetry export"),
        }
    })?;
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread at idle priority that runs jobs in order, from a bounded queue. It ends when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Worker {
    tx: SyncSender<Job>,
}

impl Worker {
    /// Starts the thread; at most `queue` jobs wait for it.
    pub fn start(name: &str, queue: usize) -> std::io::Result<Worker> {
        let (tx, rx) = sync_channel::<Job>(queue);
        std::thread::Builder::new().name(name.into()).spawn(move || {
            lower_this_thread();
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
        Ok(Worker { tx })
    }

    /// Runs `f` on the thread and returns what it returns; `None` when the queue is full (the
    /// caller sheds the work) or the thread has gone.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = ack.send(f());
        });
        match self.tx.try_send(job) {
            Ok(()) => done.await.ok(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_runs_on_the_idle_thread_and_answers() {
        let w = Worker::start("idle-test", 4).expect("thread");
        let (name, policy) = w
            .run(|| {
                let name = std::thread::current().name().map(str::to_string);
                (name, thread_priority::thread_schedule_policy().ok())
            })
            .await
            .expect("ran");
        assert_eq!(name.as_deref(), Some("idle-test"));
        if cfg!(target_os = "linux") {
            assert_eq!(policy, Some(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)));
        }
    }

    #[test]
    fn a_spawned_task_runs_on_its_own_runtime_and_the_thread_ends_with_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("idle-task", move || async move {
            tokio::task::yield_now().await;
            let _ = tx.send(thread_priority::thread_schedule_policy().ok());
        })
        .expect("thread");
        let policy = rx.recv().expect("the task ran");
        if cfg!(target_os = "linux") {
            assert_eq!(policy, Some(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)));
        }
    }
}

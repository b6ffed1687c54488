//! The sidecar's tokio runtime, sized by [`Settings::worker_threads`].
//!
//! One worker (the default) is a current-thread runtime: the thread that
//! handles a call also polls the sockets, so a call's request, its upstream
//! exchange and its response never wait for another thread to wake. A
//! multi-threaded runtime hands a woken task to a parked worker (a `futex`
//! wake-up and a context switch, on an idle core also the core's wake-up
//! latency) and costs a thread per worker; it is worth it only where the
//! sidecar may use more than one core, which is what the injection webhook
//! derives the count from.
//!
//! [`Settings::worker_threads`]: crate::settings::Settings::worker_threads

use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// Name of the runtime's worker threads (and of its blocking pool's); at
/// most 15 bytes, what Linux keeps of a thread's name.
pub const THREAD_NAME: &str = "chaperone-rt";

/// Builds the runtime for `worker_threads` workers: current-thread for one,
/// multi-threaded otherwise; I/O and timers enabled.
pub fn build(worker_threads: NonZeroUsize) -> std::io::Result<Runtime> {
    let mut builder = if worker_threads.get() == 1 {
        Builder::new_current_thread()
    } else {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(worker_threads.get());
        builder
    };
    builder.thread_name(THREAD_NAME).enable_all().build()
}

/// Runs `work` (CPU-heavy or blocking: compiling a policy, indexing a
/// snapshot) on the runtime's blocking pool, so that the worker, which may
/// be the only one, keeps serving calls meanwhile. Its panic is resumed
/// here; `None` only when the runtime shuts down before it ran.
pub async fn off_worker<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(work)).await {
        Ok(value) => Some(value),
        Err(err) => match err.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process whose name is [`THREAD_NAME`].
    fn named_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim_end() == THREAD_NAME)
            .count()
    }

    #[test]
    fn one_worker_runs_everything_on_the_calling_thread() {
        let runtime = build(NonZeroUsize::MIN).unwrap();
        let caller = std::thread::current().id();
        let (in_task, in_timer) = runtime.block_on(async {
            let spawned = tokio::spawn(async { std::thread::current().id() });
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            (spawned.await.unwrap(), std::thread::current().id())
        });
        assert_eq!(in_task, caller, "a spawned task ran on another thread");
        assert_eq!(in_timer, caller);
    }

    #[test]
    fn work_off_the_worker_runs_on_another_thread_and_keeps_its_panic() {
        // Not `build`: its blocking threads would carry THREAD_NAME, which
        // the test next door counts.
        let runtime = Builder::new_current_thread().build().unwrap();
        let worker = std::thread::current().id();
        let ran_on = runtime.block_on(off_worker(|| std::thread::current().id()));
        assert_ne!(ran_on, Some(worker));
        assert!(ran_on.is_some());
        let panicked = std::panic::catch_unwind(|| {
            runtime.block_on(off_worker(|| -> u8 { panic!("policy compiler bug") }))
        })
        .unwrap_err();
        assert_eq!(
            panicked.downcast_ref::<&str>(),
            Some(&"policy compiler bug")
        );
    }

    #[test]
    fn more_workers_are_that_many_threads() {
        let before = named_threads();
        let runtime = build(NonZeroUsize::new(3).unwrap()).unwrap();
        // Workers start when the runtime is built; wait for all to name themselves.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while named_threads() < before + 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(named_threads(), before + 3);
        let on_worker = runtime.block_on(async {
            tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap()
        });
        assert_eq!(on_worker.as_deref(), Some(THREAD_NAME));
    }
}

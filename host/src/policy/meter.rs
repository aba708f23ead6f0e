//! What one plugin instance uses of its time: guest time (only while wasmtime runs the
//! guest's code) and host time (while the guest waits in a host call such as kv), counted
//! per hook call.
//!
//! A hook's `timeout_ms` bounds guest time alone: waiting on the store, a busy tokio
//! runtime or a slow host call never counts against it, and guest time is the CPU time of
//! the thread that runs the guest (not the wall clock, which also runs while the OS gives
//! the core to another process), so a plugin does not time out because the machine is
//! loaded: on 2 cores under CI's load, a config parse of a few ms took over 50 ms of wall
//! time and an auth plugin failing closed answered 500. Host calls have their own budget per hook call
//! ([`HOST_TIME_PER_HOOK`]), and the whole call has a wall-time bound as the last line
//! (`run_hook` in mod.rs), so every hook ends whatever the guest does.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::limits::HOST_TIME_PER_HOOK;

/// The counters of one plugin instance's current hook call.
#[derive(Default)]
pub struct Meter {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    guest: Duration,
    /// Set while the guest runs (inside `poll`, outside host calls): when, and the
    /// thread's CPU time then.
    guest_since: Option<(Instant, Duration)>,
    host: Duration,
    /// Set while a host call is in progress.
    host_since: Option<Instant>,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter::default())
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A new hook call starts: nothing used yet.
    pub fn reset(&self) {
        self.with(|s| *s = State::default());
    }

    /// The hook's future is being polled: the guest runs, unless it waits in a host call.
    fn resume(&self) {
        self.with(|s| {
            if s.host_since.is_none() && s.guest_since.is_none() {
                s.guest_since = Some((Instant::now(), thread_cpu_time()));
            }
        });
    }

    /// The poll returned: the guest is not running.
    fn pause(&self) {
        self.with(State::stop_guest);
    }

    /// Guest time used by the current hook call. Read on the thread running the guest
    /// (the epoch callback), as every other reading of its CPU clock is.
    pub fn guest_time(&self) -> Duration {
        self.with(|s| s.guest + s.guest_since.map_or(Duration::ZERO, |(_, cpu)| thread_cpu_time().saturating_sub(cpu)))
    }

    /// How long (wall time) the guest has held its thread since it was last resumed (zero
    /// when it is not running).
    pub fn running_for(&self) -> Duration {
        self.with(|s| s.guest_since.map_or(Duration::ZERO, |(since, _)| since.elapsed()))
    }

    /// Enters a host call: guest time stops, host time runs until the guard drops. Returns
    /// the guard and how long this call may wait: what is left of the hook's host budget.
    pub fn host_call(self: &Arc<Self>) -> (HostCall, Duration) {
        let left = self.with(|s| {
            s.stop_guest();
            s.host_since = Some(Instant::now());
            HOST_TIME_PER_HOOK.saturating_sub(s.host)
        });
        (HostCall { meter: self.clone() }, left)
    }
}

/// An open host call; dropping it ends it and the guest's time runs again.
pub struct HostCall {
    meter: Arc<Meter>,
}

impl Drop for HostCall {
    fn drop(&mut self) {
        self.meter.with(|s| {
            if let Some(since) = s.host_since.take() {
                s.host += since.elapsed();
            }
            s.guest_since = Some((Instant::now(), thread_cpu_time()));
        });
    }
}

impl State {
    fn stop_guest(&mut self) {
        if let Some((_, cpu)) = self.guest_since.take() {
            self.guest += thread_cpu_time().saturating_sub(cpu);
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec for the call's duration, and
    // CLOCK_THREAD_CPUTIME_ID is a clock every supported OS (Linux, macOS) has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    match rc {
        0 => Duration::new(t.tv_sec as u64, t.tv_nsec as u32),
        _ => Duration::ZERO,
    }
}

/// A hook call's future whose guest time counts only inside `poll`.
pub struct Metered<'a, T> {
    meter: Arc<Meter>,
    call: Pin<Box<dyn Future<Output = T> + Send + 'a>>,
}

impl<'a, T> Metered<'a, T> {
    pub fn new(meter: Arc<Meter>, call: impl Future<Output = T> + Send + 'a) -> Metered<'a, T> {
        Metered { meter, call: Box::pin(call) }
    }
}

impl<T> Future for Metered<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        this.meter.resume();
        let result = this.call.as_mut().poll(cx);
        this.meter.pause();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn time_waiting_outside_poll_or_in_host_calls_is_not_guest_time() {
        let meter = Meter::new();
        meter.reset();
        let m = meter.clone();
        let call = async move {
            // Busy for 20 ms of "guest" (CPU) time.
            let started = thread_cpu_time();
            while thread_cpu_time() - started < Duration::from_millis(20) {
                std::hint::spin_loop();
            }
            // A host call that waits 100 ms.
            let (guard, left) = m.host_call();
            assert_eq!(left, HOST_TIME_PER_HOOK);
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(guard);
            // A yield to the runtime that waits another 100 ms.
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Metered::new(meter.clone(), call).await;
        let guest = meter.guest_time();
        assert!(guest >= Duration::from_millis(20), "{guest:?}");
        assert!(guest < Duration::from_millis(150), "waiting counted as guest time: {guest:?}");
        let (_guard, left) = meter.host_call();
        assert!(left <= HOST_TIME_PER_HOOK - Duration::from_millis(100), "host time was not counted: {left:?}");
    }
}

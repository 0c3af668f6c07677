//! Store change events: the local replica's, or, on a machine without a
//! replica, those relayed from a storage machine over the peer channel's
//! `watch` service.

use super::Store;
use crate::peer;
use ployz_consensus::KvEvent;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::broadcast;

impl Store {
    /// Store change events: the local replica's, or those relayed from a
    /// storage machine.
    pub(crate) fn events(&self) -> broadcast::Receiver<KvEvent> {
        if self.has_replica() {
            self.node.subscribe()
        } else {
            self.remote_events.subscribe()
        }
    }

    /// The local replica's own events (what the `watch` service relays).
    pub(crate) fn replica_events(&self) -> broadcast::Receiver<KvEvent> {
        self.node.subscribe()
    }

    /// On a machine without a replica: follow a storage machine's change
    /// events (failing over between them) and republish them locally.
    /// Every (re)connection first announces `Reset`, so watchers re-read.
    /// Runs until aborted.
    pub(crate) async fn relay_events(self: Arc<Self>) {
        use ployz_consensus::FrameConn as _;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.has_replica() {
                continue;
            }
            let (Some(secret), Some(file)) = (self.local.secret().get(), self.local.get()) else {
                continue;
            };
            for (id, addr) in file.storage_peers {
                let Ok(mut conn) =
                    peer::dial(&addr, peer::Service::Watch, &secret, &self.machine_id).await
                else {
                    continue;
                };
                self.set_events_from(Some(id));
                let _ = self.remote_events.send(KvEvent::Reset);
                // A machine promoted to storage while relaying has its own replica's events
                // from then on: stop relaying (the storage machine would otherwise send it
                // every change for as long as the stream lives), checked at most once a second
                // as events arrive (`recv` is not cancel-safe, so no timeout around it; an idle
                // stream costs nothing).
                let mut checked = tokio::time::Instant::now();
                while let Ok(Some(frame)) = conn.recv().await {
                    match serde_json::from_slice::<KvEvent>(&frame) {
                        Ok(ev) => {
                            let _ = self.remote_events.send(ev);
                        }
                        Err(_) => break,
                    }
                    if checked.elapsed() >= Duration::from_secs(1) {
                        if self.has_replica() {
                            break;
                        }
                        checked = tokio::time::Instant::now();
                    }
                }
                self.set_events_from(None);
                let _ = self.remote_events.send(KvEvent::Reset);
                if self.has_replica() {
                    break;
                }
            }
        }
    }

    /// The storage machine whose events are relayed here, while they are.
    pub(crate) fn events_from(&self) -> Option<String> {
        self.events_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_events_from(&self, id: Option<String>) {
        *self.events_from.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Wake `changed` on every change to `bucket` (from the local replica,
    /// or relayed from a storage machine). Runs until aborted.
    ///
    /// One task per store ([`dispatch`]) follows the events and wakes only
    /// the watchers of the bucket that changed: a dozen watchers each
    /// receiving (a clone of) every change, and each woken for it, cost a
    /// replica more than the write itself.
    pub(crate) async fn watch_bucket(
        self: Arc<Self>,
        bucket: &'static str,
        changed: Arc<tokio::sync::Notify>,
    ) {
        let _registered = self.bucket_watchers.add(bucket, changed);
        if !self.bucket_watchers.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(dispatch(Arc::downgrade(&self)));
        }
        std::future::pending::<()>().await;
    }
}

/// The watchers of [`Store::watch_bucket`], by bucket.
#[derive(Default)]
pub(crate) struct BucketWatchers {
    subs: Mutex<Vec<(u64, &'static str, Arc<tokio::sync::Notify>)>>,
    next_id: AtomicU64,
    /// Whether the [`dispatch`] task was started.
    running: AtomicBool,
}

impl BucketWatchers {
    fn subs(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(u64, &'static str, Arc<tokio::sync::Notify>)>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(
        self: &Arc<Self>,
        bucket: &'static str,
        changed: Arc<tokio::sync::Notify>,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subs().push((id, bucket, changed));
        Registered {
            watchers: self.clone(),
            id,
        }
    }

    /// Wakes the watchers of `bucket`, or all of them.
    fn notify(&self, bucket: Option<&str>) {
        for (_, b, changed) in self.subs().iter() {
            if bucket.is_none_or(|x| x == *b) {
                changed.notify_one();
            }
        }
    }
}

/// Removes a watcher when its [`Store::watch_bucket`] future is dropped.
struct Registered {
    watchers: Arc<BucketWatchers>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.watchers.subs().retain(|(id, _, _)| *id != self.id);
    }
}

/// Follows the store's change events (re-subscribing when this machine
/// gains or loses its replica: the source changes) and wakes the watchers
/// of each changed bucket; all of them on a reset, a lag or a change of
/// source. Ends with the store.
async fn dispatch(store: Weak<Store>) {
    use broadcast::error::RecvError;
    loop {
        let Some(s) = store.upgrade() else { return };
        let replica = s.has_replica();
        let mut rx = s.events();
        let watchers = s.bucket_watchers.clone();
        drop(s);
        let mut checked = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(KvEvent::Entry(e))) => watchers.notify(Some(&e.bucket)),
                Ok(Ok(KvEvent::Reset)) | Ok(Err(RecvError::Lagged(_))) => watchers.notify(None),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(RecvError::Closed)) => break,
            }
            if checked.elapsed() >= Duration::from_secs(1) {
                let Some(s) = store.upgrade() else { return };
                if s.has_replica() != replica {
                    watchers.notify(None);
                    break;
                }
                checked = tokio::time::Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future as _;
    use std::task::{Context, Waker};
    use tokio::sync::Notify;

    /// Whether `n` holds a wake-up (consumes it).
    fn woken(n: &Notify) -> bool {
        let mut f = std::pin::pin!(n.notified());
        f.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn only_the_changed_buckets_watchers_wake_and_dropped_ones_are_gone() {
        let w = Arc::new(BucketWatchers::default());
        let (a, b) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let ra = w.add("a", a.clone());
        let _rb = w.add("b", b.clone());
        w.notify(Some("a"));
        assert!(woken(&a));
        assert!(!woken(&b));
        w.notify(Some("other"));
        assert!(!woken(&a) && !woken(&b));
        w.notify(None);
        assert!(woken(&a) && woken(&b));
        drop(ra);
        w.notify(None);
        assert!(!woken(&a));
        assert!(woken(&b));
        assert_eq!(w.subs().len(), 1);
    }
}

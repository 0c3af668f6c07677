//! Store change events: the local replica's, or, on a machine without a
//! replica, those relayed from a storage machine over the peer channel's
//! `watch` service.

use super::Store;
use crate::peer;
use ployz_consensus::KvEvent;
use std::sync::Arc;
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
    pub(crate) async fn watch_bucket(
        self: Arc<Self>,
        bucket: &'static str,
        changed: Arc<tokio::sync::Notify>,
    ) {
        use broadcast::error::RecvError;
        loop {
            // Re-subscribe now and then: the event source changes when this
            // machine gains or loses its replica.
            let replica = self.has_replica();
            let mut rx = self.events();
            while self.has_replica() == replica {
                match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                    Ok(Ok(KvEvent::Entry(e))) if e.bucket == bucket => changed.notify_one(),
                    Ok(Ok(KvEvent::Reset)) | Ok(Err(RecvError::Lagged(_))) => changed.notify_one(),
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(RecvError::Closed)) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

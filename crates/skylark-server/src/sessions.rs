//! The registry of live device sessions: at most one per device.
//!
//! When a device authenticates, its connection attaches here. If the device
//! already had a live connection, that older one is told to close with
//! [`Disconnect::Replaced`]: the newer connection wins, so a device whose
//! network changed (and whose old socket is half-dead) takes over at once,
//! and no message is ever handed to two connections of one device.
//! Removing a device tells its connection to close with
//! [`Disconnect::DeviceRemoved`].

use skylark_core::{AccountId, DeviceId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// Why the server ends a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// A newer connection of the same device took over.
    Replaced,
    /// The device was removed from its account.
    DeviceRemoved,
    /// The server's operator ended the connection (the device may reconnect).
    Operator,
    /// Nothing came from the device for longer than the idle timeout
    /// (see [`Sessions::close_idle`]).
    IdleTimeout,
}

struct Entry {
    connection: u64,
    disconnect: oneshot::Sender<Disconnect>,
    /// When the connection last heard from its device (see [`SessionGuard::heard`]).
    heard: Arc<AtomicU64>,
}

/// Cluster mode: whether a device of an account is connected to another node.
pub type Elsewhere = Arc<dyn Fn(AccountId, DeviceId) -> bool + Send + Sync>;

pub struct Sessions {
    live: Mutex<HashMap<DeviceId, Entry>>,
    next_connection: AtomicU64,
    elsewhere: std::sync::OnceLock<Elsewhere>,
    /// What [`SessionGuard::heard`] counts from (tokio's clock, which tests
    /// may pause).
    epoch: tokio::time::Instant,
}

impl Default for Sessions {
    /// Connection numbers start at a random multiple of 2³², so those of
    /// different nodes of a cluster (which meet in one actor) do not collide.
    fn default() -> Self {
        let base = u64::from(rand::random::<u32>() >> 1) << 32;
        Self {
            live: Mutex::default(),
            next_connection: AtomicU64::new(base),
            elsewhere: std::sync::OnceLock::new(),
            epoch: tokio::time::Instant::now(),
        }
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("live", &self.live_count()).finish()
    }
}

/// Held by a connection while it is the device's live session. Dropping it
/// detaches the connection, unless a newer one has replaced it already.
#[derive(Debug)]
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    device: DeviceId,
    connection: u64,
    heard: Arc<AtomicU64>,
}

impl SessionGuard {
    /// This connection's number, unique for the life of the process.
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// The device was heard from (a frame arrived): the idle timeout
    /// starts again.
    pub fn heard(&self) {
        self.heard.store(self.sessions.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(&self.device).is_some_and(|e| e.connection == self.connection) {
            live.remove(&self.device);
        }
    }
}

impl Sessions {
    /// Makes the caller the device's live session, replacing any older one.
    /// The receiver fires when the server wants this connection closed.
    pub fn attach(self: &Arc<Self>, device: DeviceId) -> (SessionGuard, oneshot::Receiver<Disconnect>) {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let heard = Arc::new(AtomicU64::new(self.now_ms()));
        let previous = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device, Entry { connection, disconnect: tx, heard: heard.clone() });
        if let Some(old) = previous {
            // The old connection may be gone already; then there is nobody to tell.
            let _ = old.disconnect.send(Disconnect::Replaced);
            tracing::info!(%device, "device connected again; older connection replaced");
        }
        (SessionGuard { sessions: self.clone(), device, connection, heard }, rx)
    }

    /// Ends the device's live session, if it has one; true if it had.
    pub fn disconnect(&self, device: DeviceId, reason: Disconnect) -> bool {
        let entry = self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&device);
        match entry {
            Some(entry) => {
                let _ = entry.disconnect.send(reason);
                true
            }
            None => false,
        }
    }

    pub fn is_live(&self, device: DeviceId) -> bool {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&device)
    }

    /// Cluster mode: installs the check for devices connected to other nodes.
    pub fn on_elsewhere(&self, elsewhere: Elsewhere) {
        let _ = self.elsewhere.set(elsewhere);
    }

    /// Whether `account`'s `device` has a live connection here or (cluster
    /// mode) on another node.
    pub fn is_live_anywhere(&self, account: AccountId, device: DeviceId) -> bool {
        self.is_live(device) || self.elsewhere.get().is_some_and(|f| f(account, device))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ends, with [`Disconnect::IdleTimeout`], every session whose device
    /// has not been heard from for `idle` (a vanished peer's half-open
    /// socket). One sweep over every session, run every fraction of the
    /// timeout, instead of a timer in each connection (an idle connection
    /// is counted in bytes). Returns how many it ended.
    pub fn close_idle(&self, idle: std::time::Duration) -> usize {
        let Some(before) = self.now_ms().checked_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)) else {
            return 0;
        };
        let quiet: Vec<Entry> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extract_if(|_, e| e.heard.load(Ordering::Relaxed) <= before)
            .map(|(_, e)| e)
            .collect();
        let ended = quiet.len();
        for entry in quiet {
            let _ = entry.disconnect.send(Disconnect::IdleTimeout);
        }
        ended
    }

    /// Ends every live session: the server is shutting down. Each is told
    /// by its disconnect receiver closing without a reason, so a connection
    /// needs no shutdown signal of its own (an idle one is counted in bytes).
    pub fn close_all(&self) {
        let drained: Vec<Entry> =
            self.live.lock().unwrap_or_else(PoisonError::into_inner).drain().map(|(_, e)| e).collect();
        drop(drained);
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_connection_replaces_older() {
        let sessions = Arc::new(Sessions::default());
        let (old_guard, mut old_rx) = sessions.attach(DeviceId(1));
        let (_new_guard, mut new_rx) = sessions.attach(DeviceId(1));
        assert_eq!(old_rx.try_recv(), Ok(Disconnect::Replaced));
        drop(old_guard);
        assert!(sessions.is_live(DeviceId(1)), "dropping the replaced guard keeps the newer session");
        assert!(new_rx.try_recv().is_err());
    }

    #[test]
    fn disconnect_and_detach() {
        let sessions = Arc::new(Sessions::default());
        let (guard, mut rx) = sessions.attach(DeviceId(2));
        sessions.disconnect(DeviceId(2), Disconnect::DeviceRemoved);
        assert_eq!(rx.try_recv(), Ok(Disconnect::DeviceRemoved));
        assert!(!sessions.is_live(DeviceId(2)));
        drop(guard);
        let (guard, _rx) = sessions.attach(DeviceId(3));
        drop(guard);
        assert_eq!(sessions.live_count(), 0);
    }
}

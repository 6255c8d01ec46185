//! Skylark's services, on domain types: phone registration, device
//! authentication and the registry of live device sessions.
//!
//! A [`Server`] bundles them with the store, the clock and the configuration,
//! all passed in explicitly. This crate must not know wire formats or
//! transports: the gateway decodes frames and HTTP requests, calls these
//! services, and encodes their answers.

pub mod accounts;
mod actor;
pub mod auth;
pub mod bans;
pub mod cluster;
pub mod config;
pub mod devices;
pub mod directory;
pub mod http_client;
pub mod keys;
pub mod lane;
pub mod media;
pub mod messaging;
pub mod presence;
pub mod push;
pub mod ratelimit;
pub mod registration;
mod registry;
pub mod router;
pub mod sessions;
mod small_map;
pub mod sms;
pub mod trace;

use rand::RngCore;
use skylark_core::Clock;
use skylark_store::{Store, StoreError};
use std::sync::Arc;

pub use config::Config;

/// Spawns `task` on `tracker`, inside `span` when that span is enabled. A
/// disabled span (the default `info` filter disables the per-connection and
/// per-actor ones) then costs the task no room at all, which every idle
/// connection and actor would otherwise pay.
pub fn spawn_in<F>(tracker: &tokio_util::task::TaskTracker, span: tracing::Span, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if span.is_disabled() {
        tracker.spawn(task);
    } else {
        tracker.spawn(tracing::Instrument::instrument(task, span));
    }
}

/// Everything a gateway needs to serve devices.
pub struct Server {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub registration: registration::Registration,
    pub auth: auth::Authenticator,
    pub sessions: Arc<sessions::Sessions>,
    pub router: router::Router,
    pub devices: Arc<devices::Devices>,
    pub presence: Arc<presence::Presence>,
    pub pusher: push::Pusher,
    /// End-to-end encryption's key-package directory.
    pub keys: keys::KeyDirectory,
    /// Numbers the operator banned.
    pub bans: Arc<bans::Bans>,
    /// Attachments' blobs and uploads.
    pub media: media::Media,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Why the services could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the store failed while starting: {0}")]
    Store(#[from] StoreError),
    #[error("push could not be set up: {0}")]
    Push(#[from] push::PushError),
    #[error("attachments' storage could not be set up: {0}")]
    Media(#[from] media::MediaError),
}

impl Server {
    /// Builds the services over an opened store.
    pub async fn new(
        config: Config,
        store: Arc<dyn Store>,
        sms: Arc<dyn sms::SmsSender>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StartError> {
        let mut candidate = [0u8; 16];
        rand::rng().fill_bytes(&mut candidate);
        let server_id = store.server_id(candidate).await?;
        let sessions = Arc::new(sessions::Sessions::default());
        let bans = Arc::new(bans::Bans::load(store.clone(), clock.clone()).await?);
        let auth = auth::Authenticator::new(store.clone(), clock.clone(), server_id, config.limits.challenge_ttl_ms)
            .with_bans(bans.clone());
        let router = router::Router::with_limits(store.clone(), clock.clone(), config.messaging, &config.rate_limits);
        let devices = Arc::new(devices::Devices::new(
            store.clone(),
            clock.clone(),
            sessions.clone(),
            router.clone(),
            config.devices,
        ));
        let registration = registration::Registration::new(
            bans.clone(),
            store.clone(),
            sms,
            clock.clone(),
            sessions.clone(),
            devices.clone(),
            config.verification,
            &config.rate_limits,
        );
        let presence = Arc::new(presence::Presence::new(
            store.clone(),
            clock.clone(),
            config.limits.typing_ttl_ms,
            config.rate_limits.typing_per_device,
        ));
        let pusher = push::Pusher::new(store.clone(), sessions.clone(), clock.clone(), config.push.clone()).await?;
        let waker = pusher.clone();
        router.on_incoming(Arc::new(move |account| waker.wake(account)));
        let keys = keys::KeyDirectory::new(store.clone(), router.directory().clone(), &config.rate_limits);
        let mut media_config = config.media.clone();
        if media_config.dir.as_os_str().is_empty() {
            // Embedded use without a data directory (tests, examples).
            let id: String = server_id.iter().map(|b| format!("{b:02x}")).collect();
            media_config.dir = std::env::temp_dir().join(format!("skylark-media-{id}"));
        }
        let media = media::Media::open(media_config, store.clone(), clock.clone()).await?;
        Ok(Arc::new(Self {
            config,
            store,
            clock,
            registration,
            auth,
            sessions,
            router,
            devices,
            presence,
            pusher,
            keys,
            bans,
            media,
        }))
    }

    /// Cluster mode: joins the cluster (docs/CLUSTER.md) — actors placed
    /// across its nodes, presence and typing carried between them, and
    /// devices connected elsewhere counted as online for push. Call once,
    /// before serving devices.
    pub async fn join_cluster(
        &self,
        config: cluster::ClusterConfig,
    ) -> Result<Arc<cluster::Cluster>, cluster::ClusterError> {
        let cluster = self.router.join_cluster(config).await?;
        cluster.carry_presence(&self.presence).await?;
        cluster.carry_links(&self.devices).await?;
        cluster.carry_sessions(&self.sessions).await?;
        let presence = Arc::downgrade(&self.presence);
        self.sessions.on_elsewhere(Arc::new(move |account, device| {
            presence.upgrade().is_some_and(|p| p.live_elsewhere(account, device))
        }));
        Ok(cluster)
    }

    /// Resumes the forwards that a restart or a crash left in outboxes, by
    /// starting their actors (this node's share in cluster mode), so each
    /// reaches its recipient even if its sender never reconnects. Call once
    /// at start, after [`Server::join_cluster`] in cluster mode; returns how
    /// many actors it woke.
    pub async fn resume_forwards(&self) -> Result<usize, StoreError> {
        let woken = self.router.resume_forwards().await?;
        if woken > 0 {
            tracing::info!(actors = woken, "resumed the forwards left pending before the start");
        }
        Ok(woken)
    }

    /// Stops the user actors after their current batch (their writes are
    /// durable when this returns). Call after the gateway has shut down.
    pub async fn shutdown(&self) {
        self.pusher.shutdown().await;
        self.router.shutdown().await;
        self.devices.flush_last_seen().await;
    }

    /// The operator ends the live sessions of `devices`, on whichever node
    /// they are connected (they may connect again, unless banned). Returns
    /// how many ended, and how many cluster nodes did not answer in time.
    pub async fn disconnect_devices(&self, devices: &[skylark_core::DeviceId]) -> (usize, usize) {
        use sessions::Disconnect;
        match self.router.cluster() {
            Some(cluster) => cluster.disconnect_everywhere(devices).await,
            None => (devices.iter().filter(|d| self.sessions.disconnect(**d, Disconnect::Operator)).count(), 0),
        }
    }

    /// Live device sessions, on every node of a cluster; and how many nodes
    /// did not answer in time.
    pub async fn live_sessions(&self) -> (usize, usize) {
        match self.router.cluster() {
            Some(cluster) => cluster.live_sessions().await,
            None => (self.sessions.live_count(), 0),
        }
    }

    /// Deletes attachments past their retention and abandoned uploads.
    /// Call every `media.collect_every_ms`.
    pub async fn collect_media(&self) -> Result<media::Collected, media::MediaError> {
        self.media.collect().await
    }

    /// Purges from the store the payloads of disappearing messages whose
    /// time has come (in every log holding a copy). Returns how many copies
    /// it handled. Call every `messaging.expiry_sweep_ms`.
    pub async fn expire_messages(&self) -> Result<usize, StoreError> {
        const BATCH: usize = 1000;
        let mut total = 0;
        loop {
            let n = self.store.expire(self.clock.now_ms(), BATCH).await?;
            total += n;
            metrics::counter!("skylark_messages_purged_total", "why" => "expired").increment(n as u64);
            if n < BATCH {
                return Ok(total);
            }
        }
    }

    /// Periodic clean-up: forgets idle rate-limit keys and expired link
    /// codes, writes pending last-seen times, and purges verification
    /// sessions older than a day.
    /// Call every minute or so.
    pub async fn housekeeping(&self) {
        self.registration.forget_idle_limits();
        self.devices.sweep();
        self.pusher.sweep();
        self.router.sweep();
        self.presence.sweep();
        self.keys.sweep();
        self.devices.flush_last_seen().await;
        if self.router.cluster().is_some() {
            // Another node may have deleted an account whose number is cached here.
            self.router.directory().clear();
        }
        if let Err(e) = self.bans.reload().await {
            tracing::warn!(error = %e, "reloading the banned numbers failed");
        }
        let day_ago = self.clock.now_ms().saturating_sub(24 * 3_600_000);
        match self.store.purge_verifications(day_ago).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "purged old verification sessions"),
            Err(e) => tracing::warn!(error = %e, "purging verification sessions failed"),
        }
    }
}

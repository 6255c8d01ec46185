//! The registry of user actors, and the messaging API on top of it.
//!
//! [`Router`] finds the actor of an account, spawning it on first use. An
//! actor that has been idle for `actor_idle_ms` retires; a message that
//! arrives meanwhile makes the router spawn a successor, which waits for
//! the retiring actor to finish before loading the account's state, so two
//! actors never write one account at the same time.

use crate::actor::{self, Context, Ctx, GroupMail, Msg, PostMail};
use crate::directory::Directory;
use crate::lane;
use crate::messaging::{DeviceEvent, GroupReply, GroupRequest, MessagingConfig, MessagingError, SendAck, SendRequest};
use crate::registry::Registry;
use skylark_core::group::{GroupError, GroupMeta};
use skylark_core::message::{DeviceChange, payload_fits, valid_client_id};
use skylark_core::{AccountId, Clock, DeviceId, PhoneNumber};
use skylark_store::Store;
use std::sync::Arc;
use tokio::sync::oneshot;

pub(crate) struct RouterInner {
    /// What actors run with: store, clock, settings, registry, waker, limiter.
    ctx: Ctx,
    /// Phone ⇄ account, resolved once at the edge (bounded cache).
    directory: Arc<Directory>,
    /// Group creations and changes per device.
    group_changes: crate::ratelimit::KeyedLimiter,
}

/// Cheap to clone; all clones share one registry.
#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("actors", &self.live_actors()).finish()
    }
}

/// The longest name a contact can be given.
pub const MAX_CONTACT_NAME_CHARS: usize = 64;

fn gone() -> MessagingError {
    MessagingError::ShuttingDown
}

impl Router {
    /// The server's clock (what disappearing messages' times are in).
    pub fn now_ms(&self) -> u64 {
        self.ctx().clock.now_ms()
    }

    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: MessagingConfig) -> Self {
        Self::with_limits(store, clock, config, &crate::config::RateLimits::default())
    }

    /// As [`Router::new`], with the per-device rate limits given.
    pub fn with_limits(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: MessagingConfig,
        limits: &crate::config::RateLimits,
    ) -> Self {
        let directory = Arc::new(Directory::new(store.clone(), crate::directory::DEFAULT_CAPACITY));
        let ctx = Arc::new(Context {
            store,
            clock,
            config,
            registry: Registry::default(),
            waker: std::sync::OnceLock::new(),
            sends: crate::ratelimit::KeyedLimiter::new("messages_per_device", limits.messages_per_device),
            cluster: std::sync::OnceLock::new(),
        });
        let group_changes =
            crate::ratelimit::KeyedLimiter::new("group_changes_per_device", limits.group_changes_per_device);
        Self { inner: Arc::new(RouterInner { ctx, directory, group_changes }) }
    }

    fn ctx(&self) -> &Ctx {
        &self.inner.ctx
    }

    /// Cluster mode: joins the cluster described by `config` (NATS and the
    /// store's membership), so actors are placed across its nodes (see
    /// `Server::join_cluster`, which also carries presence).
    pub(crate) async fn join_cluster(
        &self,
        config: crate::cluster::ClusterConfig,
    ) -> Result<Arc<crate::cluster::Cluster>, crate::cluster::ClusterError> {
        let cluster = crate::cluster::Cluster::start(config, self.ctx().store.clone(), self.ctx()).await?;
        let _ = self.ctx().cluster.set(cluster.clone());
        Ok(cluster)
    }

    /// The cluster this router is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.ctx().cluster.get()
    }

    /// Installs the function told when an account received messages.
    pub fn on_incoming(&self, waker: Arc<dyn Fn(AccountId) + Send + Sync>) {
        let _ = self.ctx().waker.set(waker);
    }

    pub fn config(&self) -> &MessagingConfig {
        &self.ctx().config
    }

    /// Housekeeping: drops idle rate-limit state.
    pub fn sweep(&self) {
        self.ctx().sends.forget_idle();
        self.inner.group_changes.forget_idle();
        let (queued, fullest) = self.ctx().registry.mailbox_depths();
        metrics::gauge!("skylark_mailbox_queued").set(queued as f64);
        metrics::gauge!("skylark_mailbox_fullest").set(fullest as f64);
        metrics::gauge!("skylark_actors_asleep").set(self.asleep_actors() as f64);
        let (retrying, oldest) = self.ctx().registry.retries();
        metrics::gauge!("skylark_forwards_retrying").set(retrying as f64);
        metrics::gauge!("skylark_forward_oldest_retry_seconds").set(oldest.as_secs_f64());
    }

    pub fn live_actors(&self) -> usize {
        self.ctx().registry.live_actors()
    }

    /// Accounts whose actor stopped while their attached devices were idle
    /// (their connections wait for the next actor, which resumes them).
    pub fn asleep_actors(&self) -> usize {
        self.ctx().registry.parked_accounts()
    }

    /// Starts the actors whose outbox holds forwards (this node's share in
    /// cluster mode), so forwards left by a restart or a crash go on even if
    /// their sender never reconnects. Returns how many actors it woke.
    pub async fn resume_forwards(&self) -> Result<usize, skylark_store::StoreError> {
        self.ctx().registry.resume_forwards(self.ctx()).await
    }

    /// Stops every actor after its current batch and waits for them.
    pub async fn shutdown(&self) {
        self.ctx().registry.shutdown().await;
    }

    async fn tell(&self, account: AccountId, msg: Msg) -> Result<(), MessagingError> {
        self.ctx().registry.tell(self.ctx(), account, msg).await
    }

    /// The phone ⇄ account directory every edge resolves through.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.inner.directory
    }

    /// Resolves a phone number to its account.
    pub async fn account_by_phone(&self, phone: &PhoneNumber) -> Result<Option<AccountId>, MessagingError> {
        Ok(self.inner.directory.account(phone).await?)
    }

    /// The phone number of an account.
    pub async fn phone_of(&self, account: AccountId) -> Result<Option<PhoneNumber>, MessagingError> {
        Ok(self.inner.directory.phone(account).await?)
    }

    /// Takes one message from `device`'s rate limit (a refused send to an
    /// unknown number; the actor charges accepted sends itself, once it
    /// knows they are not resends).
    fn charge_send(&self, device: DeviceId) -> Result<(), MessagingError> {
        self.ctx().sends.check(&device.to_string()).map_err(|l| MessagingError::RateLimited(l.retry_after))
    }

    /// Queues a send from `device` of `account`. Returns once the request is
    /// in the actor's mailbox (so requests of one connection keep their
    /// order); the receiver yields the ack once the message is durable.
    pub async fn send(
        &self,
        account: AccountId,
        device: DeviceId,
        request: SendRequest,
    ) -> Result<oneshot::Receiver<Result<SendAck, MessagingError>>, MessagingError> {
        if !valid_client_id(&request.client_id) {
            return Err(MessagingError::InvalidClientId);
        }
        let max = self.ctx().config.max_payload_bytes;
        if !payload_fits(request.payload.len(), max) {
            return Err(MessagingError::TooLarge { len: request.payload.len(), max });
        }
        let epochs = usize::from(request.commit_epoch.is_some()) + usize::from(request.message_epoch.is_some());
        if epochs > 1 || (epochs == 1 && request.group.is_none()) {
            return Err(MessagingError::CommitOutsideGroup);
        }
        if request.commit_epoch.is_some() && request.meta != skylark_core::message::MetaRequest::default() {
            return Err(skylark_core::message::MetaError::OnCommit.into());
        }
        let (reply, answer) = oneshot::channel();
        let span = tracing::Span::current();
        let SendRequest { client_id, to, group, payload, commit_epoch, message_epoch, meta } = request;
        match group {
            Some(group) if self.group_exists(group).await? => {
                let mail = PostMail {
                    author: account,
                    device,
                    client_id,
                    payload,
                    commit_epoch,
                    message_epoch,
                    meta,
                    reply,
                    span,
                };
                self.tell(group, Msg::Post(Box::new(mail))).await?;
            }
            Some(_) => return Err(GroupError::UnknownGroup.into()),
            None => {
                // The identity boundary: the actor gets an account id.
                let phone = PhoneNumber::parse(&to)?;
                let Some(to) = self.inner.directory.account(&phone).await? else {
                    // A refused send costs the sender's rate like a sent
                    // one, so guessing numbers is as slow as messaging.
                    self.charge_send(device)?;
                    return Err(MessagingError::UnknownRecipient);
                };
                let mail = actor::SendMail { device, client_id, to, payload, meta, reply, span };
                self.tell(account, Msg::Send(Box::new(mail))).await?;
            }
        }
        Ok(answer)
    }

    /// Takes one group creation or change from `device`'s rate limit. The
    /// gateway calls it before resolving the request's phone numbers, so
    /// the limit also bounds that work.
    pub fn charge_group_change(&self, device: DeviceId) -> Result<(), MessagingError> {
        self.inner.group_changes.check(&device.to_string()).map_err(|l| MessagingError::RateLimited(l.retry_after))
    }

    /// Creates a group of `account` (its first admin) and `members`.
    /// Returns once the request is queued; the receiver yields the group's
    /// state once its creation is durable; the group's actor checks the size
    /// (`skylark_core::group::too_many`). (Charge the rate limit first:
    /// [`Router::charge_group_change`], and bound the list at the edge.)
    pub async fn create_group(
        &self,
        account: AccountId,
        subject: String,
        members: Vec<AccountId>,
    ) -> Result<oneshot::Receiver<Result<GroupReply, MessagingError>>, MessagingError> {
        self.check_addable(account, &members).await?;
        let group = self.ctx().store.allocate_group().await?;
        self.ask_group(account, group, GroupRequest::Create { subject, members }).await
    }

    /// Opens the 1:1 conversation group of `account` and `with` (creating
    /// it on first use; see `AccountId::direct`). (Charge the rate limit
    /// first: [`Router::charge_group_change`].)
    pub async fn open_direct(
        &self,
        account: AccountId,
        with: AccountId,
    ) -> Result<oneshot::Receiver<Result<GroupReply, MessagingError>>, MessagingError> {
        let Some(group) = AccountId::direct(account, with) else {
            return Err(GroupError::Direct.into());
        };
        self.ask_group(account, group, GroupRequest::OpenDirect { with }).await
    }

    /// A member's request to a group (changes, info); the group's actor
    /// checks who may do what. (Charge changes to the rate limit first:
    /// [`Router::charge_group_change`].)
    pub async fn group_request(
        &self,
        account: AccountId,
        group: AccountId,
        request: GroupRequest,
    ) -> Result<oneshot::Receiver<Result<GroupReply, MessagingError>>, MessagingError> {
        if !self.group_exists(group).await? {
            return Err(GroupError::UnknownGroup.into());
        }
        if let GroupRequest::Change(skylark_core::group::GroupChange::Add { members }) = &request {
            self.check_addable(account, members).await?;
        }
        self.ask_group(account, group, request).await
    }

    /// Refuses to put into a group anyone who blocked the one adding them
    /// (the first such member is named).
    async fn check_addable(&self, by: AccountId, members: &[AccountId]) -> Result<(), MessagingError> {
        for member in members {
            if self.is_blocked_by(*member, by).await? {
                return Err(GroupError::AddRefused(*member).into());
            }
        }
        Ok(())
    }

    /// Whether `account` blocked `peer` (as stored).
    pub async fn is_blocked_by(&self, account: AccountId, peer: AccountId) -> Result<bool, MessagingError> {
        Ok(self.ctx().store.blocked(account).await?.iter().any(|(p, _)| *p == peer))
    }

    /// The accounts `account` blocked, with since when.
    pub async fn blocked(&self, account: AccountId) -> Result<Vec<(AccountId, u64)>, MessagingError> {
        Ok(self.ctx().store.blocked(account).await?)
    }

    /// `account` names `peer` in its contacts (`name` empty: forgets the
    /// name). Stored first, then recorded in the account's log so every
    /// device shows it; the receiver yields once that entry is durable.
    /// Names are 1 to 64 characters, without control characters.
    pub async fn set_contact_name(
        &self,
        account: AccountId,
        peer: AccountId,
        name: &str,
    ) -> Result<oneshot::Receiver<Result<(), MessagingError>>, MessagingError> {
        if peer == account || peer.is_group() {
            return Err(MessagingError::UnknownAccount);
        }
        let name = name.trim();
        if name.chars().count() > MAX_CONTACT_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(MessagingError::InvalidName);
        }
        let stored = (!name.is_empty()).then(|| name.to_owned());
        self.ctx().store.set_contact_name(account, peer, stored).await?;
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::ContactName { change: Box::new((peer, name.to_owned())), reply }).await?;
        Ok(answer)
    }

    /// The names `account` gave its contacts.
    pub async fn contact_names(&self, account: AccountId) -> Result<Vec<(AccountId, String)>, MessagingError> {
        Ok(self.ctx().store.contact_names(account).await?)
    }

    /// Tells the account's actor that the account is being deleted: from
    /// then on it keeps nothing that arrives (call before the store
    /// deletes it).
    pub async fn account_deleted(&self, account: AccountId) -> Result<(), MessagingError> {
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::Deleted { reply }).await?;
        answer.await.map_err(|_| gone())?
    }

    /// `account` blocks (or unblocks) `peer`. The store has it first, so
    /// every check from then on sees it; then the 1:1 conversation's group
    /// (if there is one) reads it again, and the account's log records it
    /// for its devices. The receiver yields once that entry is durable.
    /// From then on `peer`'s messages to `account` are taken and dropped
    /// (one tick for the sender), `account` may not message `peer`, and
    /// `peer` may neither see `account`'s presence or typing nor add it to
    /// groups.
    pub async fn block(
        &self,
        account: AccountId,
        peer: AccountId,
        blocked: bool,
    ) -> Result<oneshot::Receiver<Result<(), MessagingError>>, MessagingError> {
        if peer == account || peer.is_group() {
            return Err(MessagingError::UnknownAccount);
        }
        let now = self.ctx().clock.now_ms();
        self.ctx().store.set_block(account, peer, blocked.then_some(now)).await?;
        if let Some(direct) = AccountId::direct(account, peer)
            && self.group_exists(direct).await?
        {
            let (reply, answer) = oneshot::channel();
            self.tell(direct, Msg::Block { peer, blocked, reply }).await?;
            answer.await.map_err(|_| gone())??;
        }
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::Block { peer, blocked, reply }).await?;
        Ok(answer)
    }

    /// Whether `group` names an existing group. A live actor answers for
    /// itself; otherwise the store is asked, so requests naming made-up
    /// group ids never spawn actors.
    async fn group_exists(&self, group: AccountId) -> Result<bool, MessagingError> {
        if !group.is_group() {
            return Ok(false);
        }
        if self.ctx().registry.is_live(group) {
            return Ok(true);
        }
        Ok(self.ctx().store.group(group).await?.is_some())
    }

    async fn ask_group(
        &self,
        account: AccountId,
        group: AccountId,
        request: GroupRequest,
    ) -> Result<oneshot::Receiver<Result<GroupReply, MessagingError>>, MessagingError> {
        let (reply, answer) = oneshot::channel();
        self.tell(group, Msg::Group(Box::new(GroupMail { from: account, request, reply }))).await?;
        Ok(answer)
    }

    /// The groups `account` is a member of, as stored (durable state).
    pub async fn groups_of(&self, account: AccountId) -> Result<Vec<GroupMeta>, MessagingError> {
        let store = &self.ctx().store;
        let mut out = Vec::new();
        for id in store.groups_of(account).await? {
            if let Some(meta) = store.group(id).await? {
                out.push(meta);
            }
        }
        Ok(out)
    }

    /// Attaches a device's connection to its account's actor. The actor
    /// streams the backlog from the device's cursor, then `CaughtUp`, then
    /// new entries as they are written.
    pub async fn attach(
        &self,
        account: AccountId,
        device: DeviceId,
        connection: u64,
    ) -> Result<lane::Receiver<DeviceEvent>, MessagingError> {
        // Room for a full window plus the CaughtUp marker, so the actor
        // never has to wait on a slow connection.
        let (events, stream) = lane::channel(self.ctx().config.device_window + 4);
        // A device with nothing to catch up on needs no actor running.
        if actor::attach_idle(self.ctx(), account, device, connection, &events).await {
            return Ok(stream);
        }
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::Attach(Box::new(actor::AttachMail { device, connection, events, reply }))).await?;
        answer.await.map_err(|_| gone())??;
        Ok(stream)
    }

    pub async fn detach(&self, account: AccountId, device: DeviceId, connection: u64) {
        let _ = self.tell(account, Msg::Detach { device, connection }).await;
    }

    /// The device acknowledges every log entry up to `up_to`.
    pub async fn ack(&self, account: AccountId, device: DeviceId, connection: u64, up_to: u64) {
        let _ = self.tell(account, Msg::Ack { device, connection, up_to }).await;
    }

    /// The account read `peer`'s messages up to the peer's sequence `up_to`.
    /// Counts against the device's message rate, since a read receipt
    /// travels like a message.
    pub async fn mark_read(
        &self,
        account: AccountId,
        device: DeviceId,
        peer: AccountId,
        up_to: u64,
    ) -> Result<oneshot::Receiver<Result<(), MessagingError>>, MessagingError> {
        self.charge_send(device)?;
        if peer == account {
            return Err(MessagingError::UnknownAccount);
        }
        if peer.is_group() {
            // Only members mark a group read (removed members no longer
            // take part in its receipts).
            match self.ctx().store.group(peer).await? {
                None => return Err(MessagingError::UnknownAccount),
                Some(meta) if meta.member(account).is_none() => return Err(GroupError::NotAMember.into()),
                Some(_) => {}
            }
        } else if self.phone_of(peer).await?.is_none() {
            return Err(MessagingError::UnknownAccount);
        }
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::MarkRead { peer, up_to, reply }).await?;
        Ok(answer)
    }

    /// Records a change of the account's devices in its log (so every
    /// device is told); a removed device is also detached from the actor.
    pub async fn device_change(&self, account: AccountId, change: DeviceChange) -> Result<(), MessagingError> {
        let (reply, answer) = oneshot::channel();
        self.tell(account, Msg::DeviceChange { change: Box::new(change), reply }).await?;
        answer.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::SendRequest;
    use skylark_core::message::LogEntry;
    use skylark_core::{NewDevice, SystemClock};
    use skylark_store::RedbStore;
    use std::time::Duration;

    async fn account(store: &RedbStore, phone: &str) -> (AccountId, DeviceId) {
        use skylark_store::AccountStore;
        let phone = PhoneNumber::parse(phone).unwrap();
        let r = store.register(&phone, NewDevice { public_key: [1; 32], name: "t".into() }, 1).await.unwrap();
        (r.account.id, r.device.id)
    }

    async fn send(router: &Router, from: (AccountId, DeviceId), to: &str, client_id: &str) -> SendAck {
        let request = SendRequest {
            meta: Default::default(),
            client_id: client_id.into(),
            to: to.into(),
            group: None,
            payload: b"x".to_vec().into(),
            commit_epoch: None,
            message_epoch: None,
        };
        router.send(from.0, from.1, request).await.unwrap().await.unwrap().unwrap()
    }

    /// Another device of the same account (the actor does not check that
    /// it exists; the gateway authenticates devices). A device is not sent
    /// its own messages, so tests that watch a device's feed send from here.
    fn other_device(account: (AccountId, DeviceId)) -> (AccountId, DeviceId) {
        (account.0, DeviceId(account.1.0 + 1_000))
    }

    /// Waits for log entry `seq` on a device's feed (failing, not hanging,
    /// when it does not come).
    async fn entry(events: &mut crate::lane::Receiver<DeviceEvent>, seq: u64) {
        let wait = async {
            loop {
                match events.recv().await.expect("the actor feeds the device") {
                    DeviceEvent::Entry { seq: s, .. } if s == seq => return,
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("entry {seq} never came"));
    }

    /// Waits until no actor is live: virtual time moves the actors' idle
    /// timers, and real time (10 s at most) lets the store's own threads
    /// finish what a retiring actor waits for. With virtual time alone, a
    /// busy machine's slow commit made the wait end before the actor could.
    async fn all_retired(router: &Router) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while router.live_actors() != 0 {
            assert!(std::time::Instant::now() < deadline, "actors did not retire: {} live", router.live_actors());
            tokio::time::sleep(Duration::from_millis(10)).await;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[tokio::test]
    async fn two_connections_of_a_device_in_one_batch_the_older_is_told_it_was_replaced() {
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900041").await;
        let router = Router::new(store.clone(), Arc::new(SystemClock), MessagingConfig::default());
        // Alice's actor runs (a device with nothing new would attach
        // without it): her other device sent Bob a message.
        let _bob = account(&store, "+15550900042").await;
        send(&router, other_device(alice), "+15550900042", "a").await;
        // Both attaches are queued before the actor takes its next batch
        // (one thread: neither future lets it run in between).
        let (older, newer) = tokio::join!(router.attach(alice.0, alice.1, 1), router.attach(alice.0, alice.1, 2));
        let (mut older, mut newer) = (older.unwrap(), newer.unwrap());
        assert!(
            matches!(older.recv().await, Some(DeviceEvent::Closed(crate::sessions::Disconnect::Replaced))),
            "the connection superseded within the batch is told why its stream ends"
        );
        assert!(older.recv().await.is_none());
        assert!(matches!(newer.recv().await, Some(DeviceEvent::Entry { seq: 1, .. })), "the newer one is served");
        assert!(matches!(newer.recv().await, Some(DeviceEvent::CaughtUp { seq: 1 })));
        router.shutdown().await;
    }

    #[tokio::test]
    async fn made_up_group_ids_spawn_no_actors() {
        use crate::messaging::GroupRequest;
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900011").await;
        let router = Router::new(store.clone(), Arc::new(SystemClock), MessagingConfig::default());
        for n in 1..50 {
            let bogus = AccountId::group(n);
            let asked = router.group_request(alice.0, bogus, GroupRequest::Info).await;
            assert!(matches!(asked, Err(MessagingError::Group(GroupError::UnknownGroup))));
            let request = SendRequest {
                meta: Default::default(),
                client_id: format!("c{n}"),
                to: String::new(),
                group: Some(bogus),
                payload: vec![].into(),
                commit_epoch: None,
                message_epoch: None,
            };
            assert!(matches!(router.send(alice.0, alice.1, request).await, Err(MessagingError::Group(_))));
            assert!(router.mark_read(alice.0, alice.1, bogus, 1).await.is_err());
        }
        assert_eq!(router.live_actors(), 0);
        router.shutdown().await;
    }

    #[tokio::test]
    async fn idle_actors_retire_and_come_back_with_their_state() {
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900001").await;
        let bob = account(&store, "+15550900002").await;
        let config = MessagingConfig { actor_idle_ms: 50, ..MessagingConfig::default() };
        let router = Router::new(store.clone(), Arc::new(SystemClock), config);

        let first = send(&router, alice, "+15550900002", "a").await;
        assert_eq!(first.id.seq, 1);
        tokio::time::pause();
        all_retired(&router).await;

        // A successor loads the counters and the client ids from the store.
        let again = send(&router, alice, "+15550900002", "a").await;
        assert!(again.duplicate);
        assert_eq!(again.id, first.id);
        assert_eq!(send(&router, alice, "+15550900002", "b").await.id.seq, 2);
        all_retired(&router).await;

        // Bob's actor, also reloaded, streams both messages to his device in order.
        let mut events = router.attach(bob.0, bob.1, 1).await.unwrap();
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                DeviceEvent::Entry { entry, .. } => {
                    if let LogEntry::Message(m) = entry.as_ref() {
                        seen.push(m.client_id.clone());
                    }
                }
                DeviceEvent::CaughtUp { .. } if seen.len() == 2 => break,
                DeviceEvent::CaughtUp { .. } => {}
                DeviceEvent::Closed(reason) => panic!("the stream closed: {reason:?}"),
            }
        }
        assert_eq!(seen, vec!["a", "b"]);
        router.shutdown().await;
    }

    /// The next event on a device's feed (failing, not hanging).
    async fn next(events: &mut crate::lane::Receiver<DeviceEvent>) -> Option<DeviceEvent> {
        tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event came")
    }

    #[tokio::test]
    async fn an_idle_device_needs_no_running_actor_and_the_next_actor_serves_its_connection() {
        use skylark_store::MessageStore;
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900051").await;
        let bob = account(&store, "+15550900052").await;
        let config = MessagingConfig { actor_idle_ms: 50, ..MessagingConfig::default() };
        let router = Router::new(store.clone(), Arc::new(SystemClock), config);

        // Bob's device has everything (nothing yet): it is told so, and no
        // actor starts for it.
        let mut events = router.attach(bob.0, bob.1, 7).await.unwrap();
        assert!(matches!(next(&mut events).await, Some(DeviceEvent::CaughtUp { seq: 0 })));
        assert_eq!((router.live_actors(), router.asleep_actors()), (0, 1), "Bob's connection is set aside");

        // Alice's message starts Bob's actor, which feeds the same
        // connection: the entry, and no second caught-up marker.
        send(&router, alice, "+15550900052", "while-asleep").await;
        match next(&mut events).await {
            Some(DeviceEvent::Entry { seq: 1, entry }) => {
                assert!(matches!(entry.as_ref(), LogEntry::Message(m) if m.client_id == "while-asleep"))
            }
            other => panic!("expected the message, got {other:?}"),
        }
        assert_eq!(router.asleep_actors(), 0);

        // An entry not yet acknowledged keeps the actor running: it is
        // still live well after the idle time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(router.live_actors() >= 1, "Bob's actor waits for his device's ack");
        router.ack(bob.0, bob.1, 7, 1).await;
        // Then it stops, setting the connection aside again.
        all_retired(&router).await;
        assert_eq!(store.cursor(bob.0, bob.1).await.unwrap(), Some(1), "the ack was written before it stopped");
        assert_eq!(router.asleep_actors(), 1);
        assert!(events.is_empty(), "nothing more was sent: the resumed connection knew it was caught up");

        // A second connection of the device, with no actor running either:
        // the first is told it was replaced.
        let mut newer = router.attach(bob.0, bob.1, 8).await.unwrap();
        assert!(matches!(next(&mut newer).await, Some(DeviceEvent::CaughtUp { seq: 1 })));
        assert!(matches!(next(&mut events).await, Some(DeviceEvent::Closed(crate::sessions::Disconnect::Replaced))));
        assert_eq!(router.live_actors(), 0);

        // Leaving while no actor runs lets go of the connection without
        // starting one; the older connection's leaving changes nothing.
        router.detach(bob.0, bob.1, 7).await;
        assert_eq!((router.live_actors(), router.asleep_actors()), (0, 1));
        router.detach(bob.0, bob.1, 8).await;
        assert_eq!((router.live_actors(), router.asleep_actors()), (0, 0));
        assert!(next(&mut newer).await.is_none(), "the stream ended");

        // A device that is behind goes through the actor, which hands it
        // what it missed.
        send(&router, alice, "+15550900052", "while-away").await;
        all_retired(&router).await;
        let mut again = router.attach(bob.0, bob.1, 9).await.unwrap();
        assert!(matches!(next(&mut again).await, Some(DeviceEvent::Entry { seq: 2, .. })));
        assert!(matches!(next(&mut again).await, Some(DeviceEvent::CaughtUp { seq: 2 })));
        router.shutdown().await;
    }

    #[tokio::test]
    async fn acks_wait_for_the_next_durable_write_or_a_quiet_moment() {
        use skylark_store::MessageStore;
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900021").await;
        let _bob = account(&store, "+15550900022").await;
        let config = MessagingConfig { cleanup_delay_ms: 300, ..MessagingConfig::default() };
        let router = Router::new(store.clone(), Arc::new(SystemClock), config);
        // Alice's device is handed what her other device sent (seq 1) and
        // acks it.
        let mut events = router.attach(alice.0, alice.1, 1).await.unwrap();
        send(&router, other_device(alice), "+15550900022", "a").await;
        entry(&mut events, 1).await;
        router.ack(alice.0, alice.1, 1, 1).await;
        // Attaching again is answered after the ack was handled (the mailbox
        // is in order): the ack changed nothing that had to be written, so
        // nothing was.
        let _events = router.attach(alice.0, alice.1, 2).await.unwrap();
        let stored = store.cursor(alice.0, alice.1).await.unwrap().unwrap_or(0);
        assert_eq!(stored, 0, "an ack alone costs no commit");
        // Once the actor has been quiet for a moment, it is written.
        let mut written = None;
        for _ in 0..100 {
            written = store.cursor(alice.0, alice.1).await.unwrap();
            if written == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(written, Some(1), "the deferred cursor reached the store");
        router.shutdown().await;
    }

    #[tokio::test]
    async fn a_deferred_ack_rides_with_the_next_send_and_survives_a_retirement() {
        use skylark_store::MessageStore;
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let alice = account(&store, "+15550900031").await;
        let _bob = account(&store, "+15550900032").await;
        let config = MessagingConfig { actor_idle_ms: 50, ..MessagingConfig::default() };
        let router = Router::new(store.clone(), Arc::new(SystemClock), config);
        let mut events = router.attach(alice.0, alice.1, 1).await.unwrap();
        send(&router, other_device(alice), "+15550900032", "a").await;
        entry(&mut events, 1).await;
        router.ack(alice.0, alice.1, 1, 1).await;
        // The next send is made durable before its ack, and the cursor with it.
        send(&router, other_device(alice), "+15550900032", "b").await;
        assert_eq!(store.cursor(alice.0, alice.1).await.unwrap(), Some(1));

        // An ack held back when the device leaves is written before the
        // actor retires, so its successor starts from it.
        entry(&mut events, 2).await;
        router.ack(alice.0, alice.1, 1, 2).await;
        router.detach(alice.0, alice.1, 1).await;
        drop(events);
        for _ in 0..200 {
            if router.live_actors() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(router.live_actors(), 0, "the actor retired");
        assert_eq!(store.cursor(alice.0, alice.1).await.unwrap(), Some(2));
        router.shutdown().await;
    }
}

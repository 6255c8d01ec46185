//! An account's own data as a whole: exporting it (what the server keeps
//! about the account, never message content) and deleting it.
//!
//! Deleting goes in an order that keeps every promise made before it: the
//! account leaves its groups (their other members see it go, as any
//! leave); its actor is told, so from then on nothing that arrives for it
//! is kept, and it lets its devices' connections go (on whichever node of
//! a cluster they are); then the store deletes it (number freed, devices removed, log
//! and settings gone) and its devices are disconnected. What it sent
//! before is still delivered (its outbox stays).

use crate::Server;
use crate::messaging::{GroupRequest, MessagingError};
use crate::sessions::Disconnect;
use serde::Serialize;
use skylark_core::group::{GroupChange, GroupError, Role};
use skylark_core::{AccountId, DeviceId};
use skylark_store::{StoreError, Visibility};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("no such account")]
    UnknownAccount,
    /// A request the user can fix (the message says how).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a deletion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deleted {
    pub phone: String,
    pub devices_removed: usize,
    pub groups_left: usize,
}

/// The account's data as JSON (`skylark account export`).
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub format: &'static str,
    pub exported_at_ms: u64,
    pub account: ExportedAccount,
    pub profile: Option<ExportedProfile>,
    pub settings: ExportedSettings,
    pub devices: Vec<ExportedDevice>,
    pub groups: Vec<ExportedGroup>,
    pub blocked: Vec<ExportedBlock>,
    /// What is not in it, and why.
    pub note: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedAccount {
    pub id: u64,
    pub phone: String,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedProfile {
    pub name: String,
    pub about: String,
    pub visible_to: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedSettings {
    /// Who may see your presence: everyone, contacts or nobody.
    pub presence_visible_to: &'static str,
    pub two_step_verification: bool,
    pub two_step_verification_set_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedDevice {
    pub id: u64,
    pub name: String,
    pub created_at_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub online: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedGroup {
    pub id: u64,
    /// A 1:1 conversation's group (for its end-to-end encryption).
    pub direct: bool,
    pub subject: String,
    pub admin: bool,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedBlock {
    pub phone: String,
    pub since_ms: u64,
}

/// What one account may see of another's profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileView {
    pub account: AccountId,
    /// False: the profile is hidden from this watcher (or there is none),
    /// and `name` and `about` say nothing.
    pub visible: bool,
    pub name: String,
    pub about: String,
    /// Who may see it (told only to its owner).
    pub visible_to: Option<Visibility>,
}

/// Messages of a reported conversation kept with the report.
pub const REPORTED_MESSAGES: usize = 5;
/// How far back in the reporter's log they are looked for.
const REPORT_SCAN: usize = 1_000;

impl Server {
    /// `reporter` reports its conversation with `reported` (an account, or a
    /// group it is a member of) to the operator: the last few messages'
    /// ids and metadata are kept (never content), and with `block` the
    /// account is blocked too.
    pub async fn report(
        &self,
        reporter: AccountId,
        reported: AccountId,
        block: bool,
    ) -> Result<skylark_store::Report, AccountError> {
        use skylark_core::group::GroupBody;
        use skylark_core::message::LogEntry;
        if reported == reporter {
            return Err(AccountError::Messaging(MessagingError::UnknownAccount));
        }
        let direct = AccountId::direct(reporter, reported);
        let mut messages = Vec::new();
        let mut before = u64::MAX;
        let mut scanned = 0;
        while messages.len() < REPORTED_MESSAGES && scanned < REPORT_SCAN {
            let page = self.store.read_log_before(reporter, before, 200).await?;
            let Some((oldest, _)) = page.last() else { break };
            before = *oldest;
            scanned += page.len();
            for (_, entry) in &page {
                let found = match entry {
                    LogEntry::Message(m)
                        if !reported.is_group()
                            && ((m.id.sender == reported && m.to == reporter)
                                || (m.id.sender == reporter && m.to == reported)) =>
                    {
                        Some(skylark_store::ReportedMessage {
                            sender: m.id.sender,
                            seq: m.id.seq,
                            sent_at_ms: m.sent_at_ms,
                            bytes: m.payload.len() as u64,
                        })
                    }
                    LogEntry::Group(e) if e.group == reported || Some(e.group) == direct => match &e.body {
                        GroupBody::Message { payload, .. } => Some(skylark_store::ReportedMessage {
                            sender: e.by,
                            seq: e.seq,
                            sent_at_ms: e.at_ms,
                            bytes: payload.len() as u64,
                        }),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(found) = found
                    && messages.len() < REPORTED_MESSAGES
                {
                    messages.push(found);
                }
            }
            if page.len() < 200 {
                break;
            }
        }
        let blocked = block && !reported.is_group();
        if blocked {
            let answer = self.router.block(reporter, reported, true).await?;
            answer.await.unwrap_or(Err(MessagingError::ShuttingDown))?;
        }
        let mut report =
            skylark_store::Report { id: 0, at_ms: self.clock.now_ms(), reporter, reported, blocked, messages };
        report.id = self.store.add_report(report.clone()).await?;
        tracing::info!(report = report.id, %reporter, %reported, blocked, "conversation reported");
        metrics::counter!("skylark_reports_total").increment(1);
        Ok(report)
    }

    /// Sets the account's profile: name and about text (checked by
    /// `skylark_core::account::clean_profile`) and who may see them
    /// (`None`: as before, everyone for a first profile).
    pub async fn set_profile(
        &self,
        account: AccountId,
        name: &str,
        about: &str,
        visible_to: Option<Visibility>,
    ) -> Result<(), AccountError> {
        let (name, about) = skylark_core::account::clean_profile(name, about).map_err(AccountError::Invalid)?;
        let visible_to = match visible_to {
            Some(v) => v,
            None => self.store.profile(account).await?.map(|p| p.visible_to).unwrap_or_default(),
        };
        let profile = skylark_store::Profile { name, about, visible_to, updated_at_ms: self.clock.now_ms() };
        self.store.set_profile(account, Some(profile)).await?;
        Ok(())
    }

    /// What `watcher` may see of `account`'s profile: everything for its
    /// owner; for others as its `visible_to` says (contacts: accounts it
    /// wrote to), and nothing for an account it blocked.
    pub async fn profile_for(&self, account: AccountId, watcher: AccountId) -> Result<ProfileView, StoreError> {
        let hidden =
            ProfileView { account, visible: false, name: String::new(), about: String::new(), visible_to: None };
        let Some(profile) = self.store.profile(account).await? else { return Ok(hidden) };
        let own = account == watcher;
        let may = own
            || (!self.store.blocked(account).await?.iter().any(|(p, _)| *p == watcher)
                && match profile.visible_to {
                    Visibility::Everyone => true,
                    Visibility::Nobody => false,
                    Visibility::Contacts => self.store.is_contact(account, watcher).await?,
                });
        if !may {
            return Ok(hidden);
        }
        Ok(ProfileView {
            account,
            visible: true,
            name: profile.name,
            about: profile.about,
            visible_to: own.then_some(profile.visible_to),
        })
    }

    /// Everything the server keeps about `account` that is the account's
    /// own (profile, settings, devices, groups, block list); no messages.
    pub async fn export_account(&self, account: AccountId) -> Result<Export, AccountError> {
        let record = self.store.account(account).await?.ok_or(AccountError::UnknownAccount)?;
        let directory = self.router.directory();
        let phone_of = |id: AccountId| async move {
            Ok::<String, StoreError>(directory.phone(id).await?.map(|p| p.to_string()).unwrap_or_default())
        };
        let words = |v: Visibility| match v {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        };
        let presence_visible_to = words(self.store.visibility(account).await?);
        let profile = self.store.profile(account).await?.map(|p| ExportedProfile {
            name: p.name,
            about: p.about,
            visible_to: words(p.visible_to),
        });
        let pin = self.store.pin(account).await?;
        let devices = self
            .devices
            .list(account)
            .await
            .map_err(|e| AccountError::Store(StoreError::Invariant(format!("listing devices: {e}"))))?;
        let mut groups = Vec::new();
        for meta in self.router.groups_of(account).await? {
            let mut members = Vec::with_capacity(meta.members.len());
            for m in &meta.members {
                members.push(phone_of(m.account).await?);
            }
            let admin = meta.member(account).is_some_and(|m| m.role == Role::Admin);
            groups.push(ExportedGroup {
                id: meta.id.0,
                direct: meta.id.is_direct(),
                subject: meta.subject,
                admin,
                members,
            });
        }
        let mut blocked = Vec::new();
        for (peer, since_ms) in self.store.blocked(account).await? {
            blocked.push(ExportedBlock { phone: phone_of(peer).await?, since_ms });
        }
        Ok(Export {
            format: "skylark-account-export/1",
            exported_at_ms: self.clock.now_ms(),
            account: ExportedAccount {
                id: account.0,
                phone: record.phone.to_string(),
                created_at_ms: record.created_at_ms,
            },
            profile,
            settings: ExportedSettings {
                presence_visible_to,
                two_step_verification: pin.is_some(),
                two_step_verification_set_at_ms: pin.map(|p| p.set_at_ms),
            },
            devices: devices
                .into_iter()
                .map(|d| ExportedDevice {
                    id: d.device.id.0,
                    name: d.device.name.clone(),
                    created_at_ms: d.device.created_at_ms,
                    last_seen_ms: self.devices.last_seen(&d.device),
                    online: d.online,
                })
                .collect(),
            groups,
            blocked,
            note: "Messages are not part of this export: your devices hold them (end-to-end encrypted ones \
                   only there), and the server keeps an account's log only until its devices have it.",
        })
    }

    /// Deletes `account`: it leaves its groups, its number is freed (signing
    /// up with it again makes a new, empty account), its devices are removed
    /// and disconnected, and its log, settings, PIN and block list are
    /// deleted. 1:1 conversation groups keep their two members (they cannot
    /// be left); their posts to a deleted account are dropped.
    pub async fn delete_account(&self, account: AccountId) -> Result<Deleted, AccountError> {
        let phone = self.router.directory().phone(account).await?.ok_or(AccountError::UnknownAccount)?;
        let mut groups_left = 0;
        for meta in self.router.groups_of(account).await? {
            if meta.id.is_direct() {
                continue;
            }
            let asked = self.router.group_request(account, meta.id, GroupRequest::Change(GroupChange::Leave)).await;
            let left = match asked {
                Ok(answer) => answer.await.unwrap_or(Err(MessagingError::ShuttingDown)),
                Err(e) => Err(e),
            };
            match left {
                Ok(_) => groups_left += 1,
                // Left meanwhile, or the group is gone: nothing to leave.
                Err(MessagingError::Group(GroupError::NotAMember | GroupError::UnknownGroup)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.router.account_deleted(account).await?;
        let removed: Vec<DeviceId> =
            self.store.delete_account(account, self.clock.now_ms()).await?.ok_or(AccountError::UnknownAccount)?;
        for device in &removed {
            self.sessions.disconnect(*device, Disconnect::DeviceRemoved);
        }
        self.router.directory().forget(account, &phone);
        tracing::info!(%account, devices = removed.len(), groups_left, "account deleted");
        metrics::counter!("skylark_accounts_deleted_total").increment(1);
        Ok(Deleted { phone: phone.to_string(), devices_removed: removed.len(), groups_left })
    }
}

//! Groups: a roster, its rules, and the events of a group's log.
//!
//! A group is an account-like entity with its own ordered log. Its id lives
//! in the account id space with [`GROUP_ID_BIT`] set, so the router, the
//! outbox and the store treat it like any account, while nothing can ever
//! authenticate as it. Every change to a group, and every message posted to
//! it, is a [`GroupEvent`] with the group's next sequence number; the group
//! forwards each event to its members' accounts, so every member device sees
//! the same events in the same order.
//!
//! [`GroupMeta::check`] is the whole permission model: it turns a member's
//! request into the event to record, or says why not.

use crate::account::{AccountId, DeviceId};
use serde::{Deserialize, Serialize};

/// Set in every group id, never in an account id.
pub const GROUP_ID_BIT: u64 = 1 << 62;

/// Set, with [`GROUP_ID_BIT`], in the id of a 1:1 conversation's group
/// ([`AccountId::direct`]): the group end-to-end encryption orders the
/// conversation's commits in. Its members are fixed.
pub const DIRECT_ID_BIT: u64 = 1 << 61;

/// Account ids up to this many bits have a 1:1 conversation group.
const DIRECT_ACCOUNT_BITS: u32 = 30;

/// Longest group subject, in characters.
pub const MAX_SUBJECT_CHARS: usize = 100;

impl AccountId {
    /// The id of the `n`th group (n ≥ 1).
    pub fn group(n: u64) -> AccountId {
        AccountId(GROUP_ID_BIT | n)
    }

    pub fn is_group(self) -> bool {
        self.0 & GROUP_ID_BIT != 0
    }

    /// The id of the 1:1 conversation group of two accounts: the same
    /// whoever asks, and no other pair's (both ids packed into it). `None`
    /// for an account with itself, a group, or an id past 2^30.
    pub fn direct(a: AccountId, b: AccountId) -> Option<AccountId> {
        let (lo, hi) = if a.0 <= b.0 { (a.0, b.0) } else { (b.0, a.0) };
        let fits = |id: u64| id < (1 << DIRECT_ACCOUNT_BITS);
        if lo == hi || !fits(lo) || !fits(hi) {
            return None;
        }
        Some(AccountId(GROUP_ID_BIT | DIRECT_ID_BIT | (hi << DIRECT_ACCOUNT_BITS) | lo))
    }

    /// Whether this is a 1:1 conversation's group.
    pub fn is_direct(self) -> bool {
        self.is_group() && self.0 & DIRECT_ID_BIT != 0
    }

    /// The two accounts of this 1:1 conversation group (lower id first).
    pub fn direct_members(self) -> Option<(AccountId, AccountId)> {
        if !self.is_direct() {
            return None;
        }
        let mask = (1 << DIRECT_ACCOUNT_BITS) - 1;
        Some((AccountId(self.0 & mask), AccountId((self.0 >> DIRECT_ACCOUNT_BITS) & mask)))
    }

    /// The other account of this 1:1 conversation group, seen from `me`.
    pub fn direct_peer(self, me: AccountId) -> Option<AccountId> {
        if !self.is_direct() {
            return None;
        }
        let mask = (1 << DIRECT_ACCOUNT_BITS) - 1;
        let (lo, hi) = (self.0 & mask, (self.0 >> DIRECT_ACCOUNT_BITS) & mask);
        match me.0 {
            m if m == lo => Some(AccountId(hi)),
            m if m == hi => Some(AccountId(lo)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Member,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub account: AccountId,
    pub role: Role,
    /// The group sequence of the event that made it a member; it sees that
    /// event and everything after, until it leaves or is removed.
    pub joined_seq: u64,
}

/// A group's current state, rewritten whenever its roster or settings change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    pub id: AccountId,
    pub subject: String,
    pub created_by: AccountId,
    pub created_at_ms: u64,
    /// Only admins may post.
    pub admin_only: bool,
    /// Current members, in the order they joined.
    pub members: Vec<Member>,
    /// The epoch of the group's end-to-end encryption (MLS): the epoch the
    /// next commit must be made in. Every accepted commit ends one.
    #[serde(default)]
    pub mls_epoch: u64,
}

/// One event of a group's log, as every member receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEvent {
    pub group: AccountId,
    /// The group's sequence number: one order for every member.
    pub seq: u64,
    /// The member who caused it (the group itself for automatic changes).
    pub by: AccountId,
    pub at_ms: u64,
    pub body: GroupBody,
}

impl GroupEvent {
    /// The meta of a post (`None` for other events).
    pub fn post_meta(&self) -> Option<&crate::message::Meta> {
        match &self.body {
            GroupBody::Message { meta, .. } => Some(meta),
            _ => None,
        }
    }

    /// This post with its payload purged (deleted for everyone, or
    /// expired); other events are returned as they are.
    pub fn purged(&self) -> GroupEvent {
        let mut e = self.clone();
        if let GroupBody::Message { payload, meta, .. } = &mut e.body {
            *payload = bytes::Bytes::new();
            meta.purged = true;
        }
        e
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBody {
    /// A message posted by `by` from `device`.
    Message {
        device: DeviceId,
        client_id: String,
        payload: bytes::Bytes,
        meta: crate::message::Meta,
    },
    Created {
        subject: String,
        members: Vec<(AccountId, Role)>,
    },
    Added {
        members: Vec<AccountId>,
    },
    Removed {
        member: AccountId,
    },
    /// `by` left the group.
    Left,
    Promoted {
        member: AccountId,
    },
    Demoted {
        member: AccountId,
    },
    Subject {
        subject: String,
    },
    /// Posting was restricted to admins (or opened to everyone again).
    AdminOnly {
        admin_only: bool,
    },
}

/// What a member asks of a group (creation is [`GroupMeta::create`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupChange {
    /// A message, or (with `commit_epoch`) an MLS commit made in that epoch.
    Post {
        device: DeviceId,
        client_id: String,
        payload: bytes::Bytes,
        commit_epoch: Option<u64>,
        /// Checked by the group's actor against its log ([`crate::message::MetaRules`]).
        #[serde(default)]
        meta: crate::message::Meta,
    },
    Add {
        members: Vec<AccountId>,
    },
    Remove {
        member: AccountId,
    },
    Leave,
    Promote {
        member: AccountId,
    },
    Demote {
        member: AccountId,
    },
    Subject {
        subject: String,
    },
    AdminOnly {
        admin_only: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum GroupError {
    #[error("no such group")]
    UnknownGroup,
    #[error("you are not a member of this group")]
    NotAMember,
    #[error("only group admins may do that")]
    NotAnAdmin,
    #[error("only admins may post in this group")]
    AdminOnly,
    #[error("account {0} is not a member of this group")]
    NotMember(AccountId),
    #[error("account {0} is already a member of this group")]
    AlreadyMember(AccountId),
    #[error("a group has at most {0} members")]
    Full(usize),
    #[error("the group's only admin cannot step down; promote someone first")]
    LastAdmin,
    #[error("a subject is 1 to {MAX_SUBJECT_CHARS} characters, without control characters")]
    InvalidSubject,
    #[error("no members named")]
    NoMembers,
    #[error("no message with that sequence in this group")]
    UnknownMessage,
    #[error("only the sender of a message may ask who has it")]
    NotAuthor,
    #[error("a 1:1 conversation has its two members, for good")]
    Direct,
    /// The account blocked the one adding it (the gateway names its number).
    #[error("account {0} does not accept being added to groups by you")]
    AddRefused(AccountId),
    #[error(
        "the group's encryption moved on (to epoch {0}) before this arrived; \
         catch up on the group's messages, then make the change or encrypt the message again"
    )]
    StaleEpoch(u64),
}

/// The group-size rule, in one place: a group holds at most `max_members`
/// accounts, its creator and admins included. Used for the exact checks
/// below and, at the edge, to refuse a request naming more accounts than a
/// group can hold before any of them is looked up.
pub fn too_many(members: usize, max_members: usize) -> bool {
    members > max_members
}

pub fn valid_subject(subject: &str) -> bool {
    let chars = subject.chars().count();
    chars > 0 && chars <= MAX_SUBJECT_CHARS && !subject.chars().any(char::is_control) && !subject.trim().is_empty()
}

impl GroupMeta {
    /// The 1:1 conversation group of `a` and `b` (its id is
    /// [`AccountId::direct`]); both are admins, and its roster never changes.
    pub fn create_direct(id: AccountId, a: AccountId, b: AccountId, now_ms: u64) -> (GroupMeta, GroupBody) {
        let members = vec![
            Member { account: a, role: Role::Admin, joined_seq: 1 },
            Member { account: b, role: Role::Admin, joined_seq: 1 },
        ];
        let body = GroupBody::Created { subject: String::new(), members: vec![(a, Role::Admin), (b, Role::Admin)] };
        let meta = GroupMeta {
            id,
            subject: String::new(),
            created_by: a,
            created_at_ms: now_ms,
            admin_only: false,
            members,
            mls_epoch: 0,
        };
        (meta, body)
    }

    /// A new group of `creator` (its first admin) and `members`, checked
    /// against `max_members`. The creation event gets sequence 1.
    pub fn create(
        id: AccountId,
        creator: AccountId,
        subject: String,
        members: &[AccountId],
        max_members: usize,
        now_ms: u64,
    ) -> Result<(GroupMeta, GroupBody), GroupError> {
        if !valid_subject(&subject) {
            return Err(GroupError::InvalidSubject);
        }
        let mut roster = vec![Member { account: creator, role: Role::Admin, joined_seq: 1 }];
        for m in members {
            if !roster.iter().any(|r| r.account == *m) {
                roster.push(Member { account: *m, role: Role::Member, joined_seq: 1 });
            }
        }
        if too_many(roster.len(), max_members) {
            return Err(GroupError::Full(max_members));
        }
        let body = GroupBody::Created {
            subject: subject.clone(),
            members: roster.iter().map(|m| (m.account, m.role)).collect(),
        };
        let meta = GroupMeta {
            id,
            subject,
            created_by: creator,
            created_at_ms: now_ms,
            admin_only: false,
            members: roster,
            mls_epoch: 0,
        };
        Ok((meta, body))
    }

    pub fn member(&self, account: AccountId) -> Option<&Member> {
        self.members.iter().find(|m| m.account == account)
    }

    pub fn is_admin(&self, account: AccountId) -> bool {
        self.member(account).is_some_and(|m| m.role == Role::Admin)
    }

    fn admins(&self) -> usize {
        self.members.iter().filter(|m| m.role == Role::Admin).count()
    }

    /// Checks `change` asked by `by`; returns the event body to record.
    /// Changes nothing: [`GroupMeta::apply`] does, once the event has its
    /// sequence number.
    pub fn check(&self, by: AccountId, change: GroupChange, max_members: usize) -> Result<GroupBody, GroupError> {
        let Some(me) = self.member(by) else { return Err(GroupError::NotAMember) };
        if self.id.is_direct() && !matches!(change, GroupChange::Post { .. }) {
            return Err(GroupError::Direct);
        }
        let admin = me.role == Role::Admin;
        let need_admin = |ok: bool| if ok { Ok(()) } else { Err(GroupError::NotAnAdmin) };
        let need_member = |m: AccountId| self.member(m).map(|_| ()).ok_or(GroupError::NotMember(m));
        Ok(match change {
            GroupChange::Post { device, client_id, payload, commit_epoch, meta } => {
                match commit_epoch {
                    // One commit per epoch, first come first served. Any
                    // member may commit, even in an admin-only group: a
                    // commit carries key changes (a linked device, fresh
                    // keys), not a message to read.
                    Some(epoch) if epoch != self.mls_epoch => return Err(GroupError::StaleEpoch(self.mls_epoch)),
                    Some(_) => {}
                    None if self.admin_only && !admin => return Err(GroupError::AdminOnly),
                    None => {}
                }
                GroupBody::Message { device, client_id, payload, meta }
            }
            GroupChange::Add { members } => {
                need_admin(admin)?;
                let mut new: Vec<AccountId> = Vec::new();
                for m in members {
                    if self.member(m).is_some() {
                        return Err(GroupError::AlreadyMember(m));
                    }
                    if !new.contains(&m) {
                        new.push(m);
                    }
                }
                if new.is_empty() {
                    return Err(GroupError::NoMembers);
                }
                if too_many(self.members.len() + new.len(), max_members) {
                    return Err(GroupError::Full(max_members));
                }
                GroupBody::Added { members: new }
            }
            GroupChange::Remove { member } if member == by => GroupBody::Left,
            GroupChange::Remove { member } => {
                need_admin(admin)?;
                need_member(member)?;
                GroupBody::Removed { member }
            }
            GroupChange::Leave => GroupBody::Left,
            GroupChange::Promote { member } => {
                need_admin(admin)?;
                need_member(member)?;
                GroupBody::Promoted { member }
            }
            GroupChange::Demote { member } => {
                need_admin(admin)?;
                need_member(member)?;
                if self.is_admin(member) && self.admins() == 1 {
                    return Err(GroupError::LastAdmin);
                }
                GroupBody::Demoted { member }
            }
            GroupChange::Subject { subject } => {
                need_admin(admin)?;
                if !valid_subject(&subject) {
                    return Err(GroupError::InvalidSubject);
                }
                GroupBody::Subject { subject }
            }
            GroupChange::AdminOnly { admin_only } => {
                need_admin(admin)?;
                GroupBody::AdminOnly { admin_only }
            }
        })
    }

    /// Applies an event recorded with sequence `seq`. Returns the member
    /// to promote automatically, if the event left the group without an
    /// admin (the longest-standing member).
    pub fn apply(&mut self, by: AccountId, seq: u64, body: &GroupBody) -> Option<AccountId> {
        match body {
            GroupBody::Message { .. } | GroupBody::Created { .. } => {}
            GroupBody::Added { members } => {
                for m in members {
                    self.members.push(Member { account: *m, role: Role::Member, joined_seq: seq });
                }
            }
            GroupBody::Removed { member } => self.members.retain(|m| m.account != *member),
            GroupBody::Left => self.members.retain(|m| m.account != by),
            GroupBody::Promoted { member } => self.set_role(*member, Role::Admin),
            GroupBody::Demoted { member } => self.set_role(*member, Role::Member),
            GroupBody::Subject { subject } => self.subject.clone_from(subject),
            GroupBody::AdminOnly { admin_only } => self.admin_only = *admin_only,
        }
        if self.admins() == 0 { self.members.first().map(|m| m.account) } else { None }
    }

    /// A commit made in the current epoch was recorded: the next one must
    /// be made in the epoch it started.
    pub fn commit_recorded(&mut self) {
        self.mls_epoch += 1;
    }

    fn set_role(&mut self, account: AccountId, role: Role) {
        if let Some(m) = self.members.iter_mut().find(|m| m.account == account) {
            m.role = role;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AccountId = AccountId(1);
    const B: AccountId = AccountId(2);
    const C: AccountId = AccountId(3);
    const D: AccountId = AccountId(4);

    fn group() -> GroupMeta {
        GroupMeta::create(AccountId::group(1), A, "trip".into(), &[B, C, B], 4, 0).unwrap().0
    }

    #[test]
    fn group_ids_are_apart_from_account_ids() {
        assert!(AccountId::group(1).is_group());
        assert!(!AccountId(u64::from(u32::MAX)).is_group());
    }

    #[test]
    fn the_creator_is_the_admin_and_duplicates_collapse() {
        let g = group();
        assert_eq!(g.members.len(), 3);
        assert!(g.is_admin(A));
        assert!(!g.is_admin(B));
        assert_eq!(
            GroupMeta::create(AccountId::group(2), A, "x".into(), &[B, C, D, AccountId(5)], 4, 0).unwrap_err(),
            GroupError::Full(4)
        );
        assert_eq!(
            GroupMeta::create(AccountId::group(2), A, " ".into(), &[B], 4, 0).unwrap_err(),
            GroupError::InvalidSubject
        );
    }

    #[test]
    fn only_admins_manage_and_only_members_post() {
        let g = group();
        let post = || GroupChange::Post {
            meta: Default::default(),
            device: DeviceId(1),
            client_id: "c".into(),
            payload: bytes::Bytes::new(),
            commit_epoch: None,
        };
        assert_eq!(g.check(D, post(), 4), Err(GroupError::NotAMember));
        assert!(matches!(g.check(B, post(), 4), Ok(GroupBody::Message { .. })));
        assert_eq!(g.check(B, GroupChange::Add { members: vec![D] }, 4), Err(GroupError::NotAnAdmin));
        assert_eq!(g.check(B, GroupChange::Remove { member: C }, 4), Err(GroupError::NotAnAdmin));
        assert_eq!(g.check(B, GroupChange::Remove { member: B }, 4), Ok(GroupBody::Left));
        assert_eq!(g.check(A, GroupChange::Add { members: vec![C] }, 4), Err(GroupError::AlreadyMember(C)));
        assert_eq!(g.check(A, GroupChange::Add { members: vec![D, AccountId(5)] }, 4), Err(GroupError::Full(4)));
        assert_eq!(g.check(A, GroupChange::Remove { member: D }, 4), Err(GroupError::NotMember(D)));
        assert_eq!(g.check(A, GroupChange::Demote { member: A }, 4), Err(GroupError::LastAdmin));
        let mut g = g;
        g.apply(A, 2, &GroupBody::AdminOnly { admin_only: true });
        assert_eq!(g.check(B, post(), 4), Err(GroupError::AdminOnly));
        assert!(g.check(A, post(), 4).is_ok());
    }

    #[test]
    fn the_group_takes_one_commit_per_epoch() {
        let mut g = group();
        let commit = |epoch| GroupChange::Post {
            meta: Default::default(),
            device: DeviceId(1),
            client_id: "c".into(),
            payload: bytes::Bytes::new(),
            commit_epoch: Some(epoch),
        };
        assert!(g.check(B, commit(0), 4).is_ok());
        g.commit_recorded();
        // A second commit made in epoch 0 lost the race.
        assert_eq!(g.check(C, commit(0), 4), Err(GroupError::StaleEpoch(1)));
        assert_eq!(g.check(C, commit(7), 4), Err(GroupError::StaleEpoch(1)));
        assert!(g.check(C, commit(1), 4).is_ok());
        assert_eq!(g.check(D, commit(1), 4), Err(GroupError::NotAMember));
        // In an admin-only group members still commit (key changes), but do not post.
        g.apply(A, 2, &GroupBody::AdminOnly { admin_only: true });
        assert!(g.check(B, commit(1), 4).is_ok());
    }

    #[test]
    fn a_pair_has_one_direct_group_with_a_fixed_roster() {
        let id = AccountId::direct(A, B).unwrap();
        assert_eq!(AccountId::direct(B, A), Some(id), "the same whoever asks");
        assert!(id.is_group() && id.is_direct());
        assert_ne!(AccountId::direct(A, C), Some(id));
        assert_ne!(AccountId::direct(AccountId(1 << 30), B), AccountId::direct(A, B));
        assert_eq!(AccountId::direct(A, A), None);
        assert_eq!(AccountId::direct(A, AccountId(1 << 30)), None);
        assert!(!AccountId::group(5).is_direct());
        assert_eq!(id.direct_peer(A), Some(B));
        assert_eq!(id.direct_peer(B), Some(A));
        assert_eq!(id.direct_peer(C), None);
        let (g, _) = GroupMeta::create_direct(id, A, B, 0);
        let post = GroupChange::Post {
            meta: Default::default(),
            device: DeviceId(1),
            client_id: "c".into(),
            payload: bytes::Bytes::new(),
            commit_epoch: None,
        };
        assert!(g.check(B, post, 4).is_ok());
        assert_eq!(g.check(A, GroupChange::Add { members: vec![C] }, 4), Err(GroupError::Direct));
        assert_eq!(g.check(A, GroupChange::Leave, 4), Err(GroupError::Direct));
        assert_eq!(g.check(A, GroupChange::Subject { subject: "x".into() }, 4), Err(GroupError::Direct));
    }

    #[test]
    fn membership_follows_the_events() {
        let mut g = group();
        assert_eq!(g.apply(A, 2, &GroupBody::Added { members: vec![D] }), None);
        assert_eq!(g.member(D).unwrap().joined_seq, 2);
        g.apply(A, 3, &GroupBody::Removed { member: B });
        assert!(g.member(B).is_none());
        // The only admin leaves: the longest-standing member is named to take over.
        assert_eq!(g.apply(A, 4, &GroupBody::Left), Some(C));
    }
}

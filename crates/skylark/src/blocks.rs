//! `skylark block`, `unblock` and `blocked`: the account's block list;
//! `skylark report`: a conversation reported to the operator; `skylark
//! contact` and `contacts`: the names the account gives its contacts.

use crate::cli::{TransportArgs, one_request};
use anyhow::Result;
use std::path::Path;

/// Blocks (or unblocks) `phone` for this profile's account.
pub async fn set(profile: &Path, transport: &TransportArgs, phone: &str, blocked: bool) -> Result<()> {
    one_request(profile, transport, async |h| h.block(phone, blocked).await).await?;
    if blocked {
        println!(
            "Blocked {phone}. Their messages will not reach you (they see one tick), they cannot see when you are \
             online or typing, nor add you to groups. `skylark unblock {phone}` undoes it."
        );
    } else {
        println!("Unblocked {phone}: you can message each other again.");
    }
    Ok(())
}

/// Lists the accounts this account blocked.
pub async fn list(profile: &Path, transport: &TransportArgs) -> Result<()> {
    let (identity, accounts) = one_request(profile, transport, async |h| h.list_blocked().await).await?;
    if accounts.is_empty() {
        println!("You have blocked nobody.");
        return Ok(());
    }
    println!("Blocked by {}:", identity.phone);
    for a in accounts {
        println!("  {:<18} since {}", a.phone, crate::devices::utc(a.since_ms));
    }
    Ok(())
}

/// Reports the conversation with `phone` (or group `group`) to the operator.
pub async fn report(
    profile: &Path,
    transport: &TransportArgs,
    phone: Option<&str>,
    group: Option<u64>,
    block: bool,
) -> Result<()> {
    let phone_or_none = phone.unwrap_or_default();
    one_request(profile, transport, async |h| h.report(phone_or_none, group.unwrap_or(0), block).await).await?;
    let what = match (phone, group) {
        (Some(phone), _) => format!("your conversation with {phone}"),
        (None, Some(group)) => format!("group {group}"),
        (None, None) => "the conversation".to_owned(),
    };
    println!(
        "Reported {what} to the server's operator: the last few messages' times and sizes (not their text) go \
         with it.{}",
        if block { " You blocked them too." } else { "" }
    );
    Ok(())
}

/// Names the contact `phone` (or, `name` empty, forgets the name).
pub async fn name(profile: &Path, transport: &TransportArgs, phone: &str, name: &str) -> Result<()> {
    one_request(profile, transport, async |h| h.set_contact_name(phone, name).await).await?;
    if name.trim().is_empty() {
        println!("{phone} has no name any more, on all your devices.");
    } else {
        println!("{phone} is \"{}\" on all your devices.", name.trim());
    }
    Ok(())
}

/// Lists the names the account gave its contacts.
pub async fn names(profile: &Path, transport: &TransportArgs) -> Result<()> {
    let (_, contacts) = one_request(profile, transport, async |h| h.contact_names().await).await?;
    if contacts.is_empty() {
        println!("No contact has a name yet: `skylark contact +NUMBER NAME` gives one.");
    }
    for c in contacts {
        println!("  {:<18} {}", c.phone, c.name);
    }
    Ok(())
}

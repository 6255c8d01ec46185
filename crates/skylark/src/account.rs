//! The account from the command line: `skylark pin` (two-step
//! verification), `skylark account export|delete` and `skylark profile
//! set|show`.

use crate::cli::{TransportArgs, explain};
use anyhow::{Result, bail};
use skylark_client::Identity;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(clap::Subcommand)]
pub enum PinCommand {
    /// Set (or change) the PIN: asked twice on standard input.
    Set,
    /// Turn two-step verification off.
    Off,
}

/// `skylark pin [set|off]`: without an action, says whether a PIN is set.
pub async fn pin(profile: &Path, transport: &TransportArgs, action: Option<&PinCommand>) -> Result<()> {
    let identity = Identity::load(profile)?;
    let new_pin = match action {
        Some(PinCommand::Set) => Some(read_new_pin().await?),
        _ => None,
    };
    let (session, _events) =
        crate::cli::open_session(&transport.endpoint(&identity)?, &identity).await.map_err(explain)?;
    let handle = session.handle();
    let status = match action {
        None => handle.pin_status().await,
        Some(PinCommand::Set) => handle.set_pin(new_pin.as_deref()).await,
        Some(PinCommand::Off) => handle.set_pin(None).await,
    };
    session.close().await;
    let status = status.map_err(explain)?;
    let lapse = skylark_core::words::wait(status.lapse_ms);
    match (action, status.enabled) {
        (Some(PinCommand::Set), _) => println!(
            "Two-step verification is on: registering {} on another phone now needs this PIN as well as the SMS \
             code. Keep it safe. The PIN stops guarding the number if the account goes unused for {lapse}.",
            identity.phone
        ),
        (Some(PinCommand::Off), _) => {
            println!("Two-step verification is off: the SMS code alone registers {}.", identity.phone)
        }
        (None, true) => println!(
            "Two-step verification is on (since {}). `skylark pin set` changes the PIN, `skylark pin off` removes it.",
            crate::devices::utc(status.set_at_ms)
        ),
        (None, false) => println!("Two-step verification is off. `skylark pin set` turns it on."),
    }
    Ok(())
}

/// The new PIN, typed twice.
async fn read_new_pin() -> Result<String> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!("Enter a 6-digit PIN, then the same again.");
    let first = lines.next_line().await?.unwrap_or_default();
    let first = first.trim();
    if !skylark_core::pin::valid_pin(first) {
        bail!("a PIN is 6 digits; nothing was changed");
    }
    let again = lines.next_line().await?.unwrap_or_default();
    if again.trim() != first {
        bail!("the two PINs differ; nothing was changed");
    }
    Ok(first.to_owned())
}

#[derive(clap::Subcommand)]
pub enum AccountCommand {
    /// Print (or write to a file) what the server keeps about your account,
    /// as JSON: profile, settings, devices, groups, blocked numbers.
    Export {
        /// Write it to this file instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Delete your account for good: it leaves its groups, every device is
    /// signed out, the number is freed. Asks you to type your number.
    Delete {
        /// Your number, to confirm without being asked (for scripts).
        #[arg(long, value_name = "PHONE")]
        confirm: Option<String>,
    },
}

pub async fn account(profile: &Path, transport: &TransportArgs, action: &AccountCommand) -> Result<()> {
    let identity = Identity::load(profile)?;
    let confirmed = match action {
        AccountCommand::Delete { confirm: Some(phone) } => Some(phone.clone()),
        AccountCommand::Delete { confirm: None } => {
            println!(
                "Deleting {} cannot be undone: you leave your groups, every device is signed out and the number \
                 is freed. Type the number to confirm:",
                identity.phone
            );
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            Some(lines.next_line().await?.unwrap_or_default().trim().to_owned())
        }
        AccountCommand::Export { .. } => None,
    };
    if let Some(typed) = &confirmed {
        let same = skylark_core::PhoneNumber::parse(typed).is_ok_and(|p| p.as_str() == identity.phone);
        if !same {
            bail!("that is not this account's number ({}); nothing was deleted", identity.phone);
        }
    }
    let (session, _events) =
        crate::cli::open_session(&transport.endpoint(&identity)?, &identity).await.map_err(explain)?;
    let handle = session.handle();
    match action {
        AccountCommand::Export { out } => {
            let json = handle.export_account().await;
            session.close().await;
            let json = json.map_err(explain)?;
            match out {
                Some(path) => {
                    std::fs::write(path, json.as_bytes())?;
                    println!("Wrote your account's data to {}.", path.display());
                }
                None => println!("{json}"),
            }
        }
        AccountCommand::Delete { .. } => {
            let done = handle.delete_account(&identity.phone).await;
            session.close().await;
            match done {
                Ok(()) => {}
                // Signed out with every other device, before the answer came.
                Err(skylark_client::ClientError::Closed {
                    code: Some(skylark_protocol::CloseCode::DeviceRemoved),
                    ..
                }) => {}
                Err(e) => return Err(explain(e)),
            }
            println!(
                "Deleted {}. Its devices are signed out; this profile ({}) can go, or sign up again with \
                 `skylark register`.",
                identity.phone,
                profile.display()
            );
        }
    }
    Ok(())
}

/// `skylark profile set`: what is not given stays as it was.
pub async fn set_profile(
    profile: &Path,
    transport: &TransportArgs,
    name: Option<&str>,
    about: Option<&str>,
    visible_to: Option<&str>,
) -> Result<()> {
    use skylark_protocol::v1::Visibility;
    let visible = match visible_to {
        Some("everyone") => Visibility::Everyone,
        Some("contacts") => Visibility::Contacts,
        Some("nobody") => Visibility::Nobody,
        _ => Visibility::Unspecified,
    };
    let (identity, ()) = crate::cli::one_request(profile, transport, async |h| {
        let me = h.who_am_i().await?;
        let current = h.profiles(&[me.phone.as_str()]).await?.into_iter().next();
        let (old_name, old_about) = current.map(|p| (p.name, p.about)).unwrap_or_default();
        h.set_profile(name.unwrap_or(&old_name), about.unwrap_or(&old_about), visible).await
    })
    .await?;
    println!("Your profile is set. `skylark profile show` shows it as {} sees it.", identity.phone);
    Ok(())
}

/// `skylark profile show [PHONES]`.
pub async fn show_profiles(profile: &Path, transport: &TransportArgs, phones: &[String]) -> Result<()> {
    let identity = Identity::load(profile)?;
    let asked: Vec<&str> =
        if phones.is_empty() { vec![identity.phone.as_str()] } else { phones.iter().map(String::as_str).collect() };
    let (_, profiles) = crate::cli::one_request(profile, transport, async |h| h.profiles(&asked).await).await?;
    if profiles.is_empty() {
        println!("No account has those numbers.");
    }
    for p in profiles {
        if !p.visible {
            println!("{}: no profile you may see", p.phone);
            continue;
        }
        let name = if p.name.is_empty() { "(no name)" } else { p.name.as_str() };
        println!("{}: {name}", p.phone);
        if !p.about.is_empty() {
            println!("  about: {}", p.about);
        }
        let who = match skylark_protocol::v1::Visibility::try_from(p.visible_to) {
            Ok(skylark_protocol::v1::Visibility::Everyone) => Some("everyone"),
            Ok(skylark_protocol::v1::Visibility::Contacts) => Some("your contacts (people you wrote to)"),
            Ok(skylark_protocol::v1::Visibility::Nobody) => Some("nobody"),
            _ => None,
        };
        if let Some(who) = who {
            println!("  visible to: {who}");
        }
    }
    Ok(())
}

//! Account settings from the command line: `skylark pin` (two-step
//! verification).

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

//! `link` and `devices`: more devices for one account, without SMS.

use crate::cli::{TransportArgs, explain};
use anyhow::{Result, bail};
use skylark_client::api::LinkStatus;
use skylark_client::identity::generate_key;
use skylark_client::{Identity, Session};
use std::path::Path;
use std::time::Duration;

/// How long one wait on the link is held open by the server.
const LINK_POLL: Duration = Duration::from_secs(25);

/// `YYYY-MM-DD HH:MM` (UTC) of a timestamp in milliseconds.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60)
}

/// The code as a QR code drawn with Unicode half blocks.
fn qr(code: &str) -> Option<String> {
    let qr = qrcode::QrCode::new(code.as_bytes()).ok()?;
    Some(
        qr.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

/// On the new device: ask for a link code, show it, wait for approval.
pub async fn link(server: &str, name: &str, profile: &Path, ca: Option<&Path>) -> Result<()> {
    crate::cli::make_room(profile, ca).await?;
    let (api, servers) = crate::cli::api_for(server, ca)?;
    let key = generate_key();
    let link = api.create_link(&key.verifying_key().to_bytes(), name).await.map_err(explain)?;
    if let Some(qr) = qr(&link.code) {
        println!("{qr}");
    }
    println!(
        "Link code: {}  (valid for {}). On a device already signed in, run:\n  skylark link approve {}",
        link.code,
        skylark_core::words::wait(link.expires_in_ms),
        link.code
    );
    loop {
        match api.wait_link(&link.link_id, LINK_POLL.as_millis() as u64).await.map_err(explain)? {
            LinkStatus::Pending => continue,
            LinkStatus::Expired => bail!("the link code expired; run `skylark link` again"),
            LinkStatus::Approved { account_id, device_id, phone } => {
                let mut identity = Identity::new(servers.clone(), account_id, device_id, phone, &key);
                identity.ca = crate::cli::kept_ca(ca)?;
                let path = identity.save(profile)?;
                println!(
                    "Linked: this is device {device_id} of {} (account {account_id}). Identity saved in {}.",
                    identity.phone,
                    path.display()
                );
                crate::cli::publish_keys(profile, &identity, ca).await;
                return Ok(());
            }
        }
    }
}

async fn open(profile: &Path, transport: &TransportArgs) -> Result<(Identity, Session)> {
    let identity = Identity::load(profile)?;
    let (session, _events) =
        crate::cli::open_session(&transport.endpoint(&identity)?, &identity).await.map_err(explain)?;
    Ok((identity, session))
}

/// On a signed-in device: approve a code shown by a new device.
pub async fn approve(profile: &Path, transport: &TransportArgs, code: &str) -> Result<()> {
    let (identity, session) = open(profile, transport).await?;
    let device = session.handle().approve_link(code).await.map_err(explain)?;
    println!(
        "Approved: device {} \"{}\" now belongs to {}. Not yours? Remove it at once: skylark devices remove {}",
        device.id, device.name, identity.phone, device.id
    );
    session.close().await;
    Ok(())
}

pub async fn list(profile: &Path, transport: &TransportArgs) -> Result<()> {
    let (identity, session) = open(profile, transport).await?;
    let devices = session.handle().list_devices().await.map_err(explain)?;
    println!("Devices of {}:", identity.phone);
    println!("     {:>4}  {:<24} {:<18} LAST SEEN", "ID", "NAME", "ADDED");
    for d in devices {
        let seen = if d.online {
            "online".to_owned()
        } else if d.last_seen_ms == 0 {
            "never".to_owned()
        } else {
            utc(d.last_seen_ms)
        };
        let mark = if d.current { "this" } else { "" };
        println!("{mark:<4} {:>4}  {:<24} {:<18} {seen}", d.id, d.name, utc(d.created_at_ms));
    }
    session.close().await;
    Ok(())
}

pub async fn rename(profile: &Path, transport: &TransportArgs, id: u64, name: &str) -> Result<()> {
    let (_, session) = open(profile, transport).await?;
    session.handle().rename_device(id, name).await.map_err(explain)?;
    println!("Device {id} is now called {name:?}.");
    session.close().await;
    Ok(())
}

pub async fn remove(profile: &Path, transport: &TransportArgs, id: u64) -> Result<()> {
    let (identity, session) = open(profile, transport).await?;
    let result = session.handle().remove_device(id).await;
    if id == identity.device_id {
        // Removing this very device closes this connection; the answer may not arrive.
        println!("This device ({id}) was removed; its key no longer works.");
        return Ok(());
    }
    result.map_err(explain)?;
    println!("Device {id} removed: it was signed out and its key no longer works.");
    session.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc(1_795_805_100_000), "2026-11-27 18:45");
    }
}

//! End-to-end encryption's key directory: `UploadKeyPackages`,
//! `GetKeyPackageStock`, `ClaimKeyPackages`.

use super::{Caller, error, reply, unavailable};
use bytes::Bytes;
use skylark_core::keys::{KeyStock, MAX_KEY_PACKAGES_PER_DEVICE, REPLENISH_BELOW};
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::keys::KeyError;

fn stock(id: u64, stock: KeyStock) -> ServerFrame {
    reply(
        id,
        server_frame::Body::KeyPackageStock(v1::KeyPackageStock {
            available: stock.available,
            has_last_resort: stock.has_last_resort,
            replenish_below: REPLENISH_BELOW,
            max_available: MAX_KEY_PACKAGES_PER_DEVICE,
        }),
    )
}

fn key_error(id: u64, e: &KeyError) -> ServerFrame {
    let code = match e {
        KeyError::Store(e) => return unavailable(id, e),
        KeyError::Upload(_) | KeyError::InvalidPhone(_) | KeyError::BadBatch(_) => ErrorCode::InvalidArgument,
        KeyError::UnknownAccount | KeyError::UnknownNumber(_) => ErrorCode::UnknownRecipient,
        KeyError::RateLimited(_) => ErrorCode::RateLimited,
    };
    let mut frame = error(id, code, e.to_string());
    if let (KeyError::RateLimited(limited), Some(server_frame::Body::Error(err))) = (e, frame.body.as_mut()) {
        err.retry_after_ms = u64::try_from(limited.retry_after.as_millis()).unwrap_or(u64::MAX).max(1);
    }
    frame
}

pub(super) async fn upload(caller: &Caller<'_>, id: u64, upload: v1::UploadKeyPackages) -> ServerFrame {
    let last_resort = (!upload.last_resort.is_empty()).then_some(upload.last_resort);
    let packages: Vec<Bytes> = upload.key_packages;
    match caller.shared.server.keys.upload(caller.authed.device, packages, last_resort).await {
        Ok(s) => stock(id, s),
        Err(e) => key_error(id, &e),
    }
}

pub(super) async fn get_stock(caller: &Caller<'_>, id: u64) -> ServerFrame {
    match caller.shared.server.keys.stock(caller.authed.device).await {
        Ok(s) => stock(id, s),
        Err(e) => key_error(id, &e),
    }
}

pub(super) async fn claim(caller: &Caller<'_>, id: u64, claim: v1::ClaimKeyPackages) -> ServerFrame {
    let keys = &caller.shared.server.keys;
    let device = caller.authed.device;
    if claim.phones.is_empty() {
        return match keys.claim(device, &claim.phone).await {
            Ok(claimed) => reply(id, server_frame::Body::ClaimedKeyPackages(claimed_frame(claimed))),
            Err(e) => key_error(id, &e),
        };
    }
    if !claim.phone.is_empty() {
        let words = "a claim names either one phone number (phone) or several (phones), not both";
        return error(id, ErrorCode::InvalidArgument, words);
    }
    match keys.claim_many(device, &claim.phones).await {
        Ok(claimed) => reply(
            id,
            server_frame::Body::ClaimedKeyPackages(v1::ClaimedKeyPackages {
                accounts: claimed.into_iter().map(claimed_frame).collect(),
                ..Default::default()
            }),
        ),
        Err(e) => key_error(id, &e),
    }
}

fn claimed_frame(claimed: skylark_server::keys::Claimed) -> v1::ClaimedKeyPackages {
    v1::ClaimedKeyPackages {
        account_id: claimed.account.0,
        phone: claimed.phone.as_str().to_owned(),
        devices: claimed
            .devices
            .into_iter()
            .zip(claimed.device_keys)
            .map(|(d, key)| v1::DeviceKeyPackage {
                device_id: d.device.0,
                key_package: d.package.unwrap_or_default(),
                last_resort: d.last_resort,
                device_key: key.to_vec(),
            })
            .collect(),
        accounts: Vec::new(),
    }
}

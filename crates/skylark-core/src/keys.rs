//! The rules of the key-package directory: how many MLS key packages a
//! device may publish and how large each may be.
//!
//! End-to-end encryption (MLS, RFC 9420) lets one device add another to a
//! conversation while the other is offline, by taking one of the key
//! packages it published in advance. Each package is used once (a claim
//! consumes it), so a device keeps a stock and tops it up; a *last-resort*
//! package is handed out when the stock is empty and is never consumed, so
//! a device stays reachable however many claims arrive before it comes
//! back. The server never reads a package: it is opaque bytes here, checked
//! by the claiming client.
//!
//! These are the limits, checked before anything is stored; the directory
//! itself is `skylark_server::keys` and its storage
//! `skylark_store::KeyPackageStore`.

/// Bytes of one key package. An MLS key package with an Ed25519 basic
/// credential is about 300 bytes; certificates or extensions may add a few
/// kilobytes, and nothing needs more.
pub const MAX_KEY_PACKAGE_BYTES: usize = 8 * 1024;

/// Key packages in one upload (they must also fit in one frame).
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;

/// Key packages one device may hold unclaimed: a bound on what a device
/// can make the server keep, and plenty for the claims between two of its
/// connections.
pub const MAX_KEY_PACKAGES_PER_DEVICE: u32 = 200;

/// Below this many unclaimed packages a device should upload more.
pub const REPLENISH_BELOW: u32 = 20;

/// What a device has published, as it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyStock {
    /// Unclaimed one-time packages.
    pub available: u32,
    pub has_last_resort: bool,
}

/// An upload the directory refuses, before storing anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("the upload holds no key package")]
    Empty,
    #[error("{count} key packages in one upload; at most {max} are accepted at a time")]
    TooMany { count: usize, max: usize },
    #[error("a key package of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("a key package is empty")]
    EmptyPackage,
    #[error("this device already holds {available} unclaimed key packages; at most {max} are kept, so upload fewer")]
    StockFull { available: u32, max: u32 },
}

/// Checks an upload's shape: `packages` are the lengths of the one-time
/// packages, `last_resort` the length of the last-resort one if given.
/// Whether the stock has room is [`check_room`], decided where the stock is
/// read (the store, under its lock).
pub fn check_upload(packages: &[usize], last_resort: Option<usize>) -> Result<(), UploadError> {
    if packages.is_empty() && last_resort.is_none() {
        return Err(UploadError::Empty);
    }
    if packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
        return Err(UploadError::TooMany { count: packages.len(), max: MAX_KEY_PACKAGES_PER_UPLOAD });
    }
    for &len in packages.iter().chain(last_resort.iter()) {
        if len == 0 {
            return Err(UploadError::EmptyPackage);
        }
        if len > MAX_KEY_PACKAGE_BYTES {
            return Err(UploadError::TooLarge { len, max: MAX_KEY_PACKAGE_BYTES });
        }
    }
    Ok(())
}

/// Whether `adding` more packages fit beside the `available` ones.
pub fn check_room(available: u32, adding: usize) -> Result<(), UploadError> {
    if available as usize + adding > MAX_KEY_PACKAGES_PER_DEVICE as usize {
        return Err(UploadError::StockFull { available, max: MAX_KEY_PACKAGES_PER_DEVICE });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-time package sizes, the last-resort one's, the verdict.
    type Case = (&'static [usize], Option<usize>, Result<(), UploadError>);

    #[test]
    fn uploads_are_checked_before_storing() {
        let table: &[Case] = &[
            (&[300, 300], Some(300), Ok(())),
            (&[], Some(300), Ok(())),
            (&[300], None, Ok(())),
            (&[], None, Err(UploadError::Empty)),
            (&[300, 0], None, Err(UploadError::EmptyPackage)),
            (&[], Some(0), Err(UploadError::EmptyPackage)),
            (&[MAX_KEY_PACKAGE_BYTES], None, Ok(())),
            (
                &[MAX_KEY_PACKAGE_BYTES + 1],
                None,
                Err(UploadError::TooLarge { len: MAX_KEY_PACKAGE_BYTES + 1, max: MAX_KEY_PACKAGE_BYTES }),
            ),
            (
                &[300],
                Some(MAX_KEY_PACKAGE_BYTES + 1),
                Err(UploadError::TooLarge { len: MAX_KEY_PACKAGE_BYTES + 1, max: MAX_KEY_PACKAGE_BYTES }),
            ),
        ];
        for (packages, last_resort, want) in table {
            assert_eq!(&check_upload(packages, *last_resort), want, "{packages:?} {last_resort:?}");
        }
        let many = vec![300; MAX_KEY_PACKAGES_PER_UPLOAD + 1];
        assert_eq!(
            check_upload(&many, None),
            Err(UploadError::TooMany { count: MAX_KEY_PACKAGES_PER_UPLOAD + 1, max: MAX_KEY_PACKAGES_PER_UPLOAD })
        );
    }

    #[test]
    fn the_stock_is_bounded() {
        assert_eq!(check_room(0, MAX_KEY_PACKAGES_PER_DEVICE as usize), Ok(()));
        assert_eq!(check_room(MAX_KEY_PACKAGES_PER_DEVICE - 1, 1), Ok(()));
        assert_eq!(
            check_room(MAX_KEY_PACKAGES_PER_DEVICE - 1, 2),
            Err(UploadError::StockFull {
                available: MAX_KEY_PACKAGES_PER_DEVICE - 1,
                max: MAX_KEY_PACKAGES_PER_DEVICE
            })
        );
    }
}

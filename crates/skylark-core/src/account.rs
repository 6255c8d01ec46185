//! Accounts and their devices.

use crate::phone::PhoneNumber;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An account, identified internally by a number that never changes even if
/// the phone number is re-verified on another device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountId(pub u64);

/// A device of an account. Device ids are unique across the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u64);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub phone: PhoneNumber,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub account_id: AccountId,
    /// The device's Ed25519 public key; the matching secret never leaves the device.
    pub public_key: [u8; 32],
    pub name: String,
    pub created_at_ms: u64,
    /// Set when the device was removed; a removed device can never
    /// authenticate again, and its record stays so that it gets a precise error.
    pub removed_at_ms: Option<u64>,
    /// When the device last authenticated or disconnected.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
}

impl Device {
    pub fn is_active(&self) -> bool {
        self.removed_at_ms.is_none()
    }
}

/// What a client supplies to enrol a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub public_key: [u8; 32],
    pub name: String,
}

/// Longest device name accepted, in bytes.
pub const MAX_DEVICE_NAME_BYTES: usize = 64;

/// Trims a requested device name and refuses one that is too long or holds
/// control characters.
pub fn clean_device_name(name: &str) -> Result<String, &'static str> {
    let name = name.trim();
    if name.len() > MAX_DEVICE_NAME_BYTES {
        return Err("device name longer than 64 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("device name contains control characters");
    }
    Ok(if name.is_empty() { "device".to_owned() } else { name.to_owned() })
}

/// The longest profile name, in characters (as WhatsApp's).
pub const MAX_PROFILE_NAME_CHARS: usize = 25;
/// The longest "about" text, in characters (as WhatsApp's).
pub const MAX_ABOUT_CHARS: usize = 139;

/// A profile's name and about text, trimmed; refused when too long or with
/// control characters (a name may be empty: the number is shown then).
pub fn clean_profile(name: &str, about: &str) -> Result<(String, String), String> {
    let (name, about) = (name.trim(), about.trim());
    if name.chars().count() > MAX_PROFILE_NAME_CHARS {
        return Err(format!("a profile name is at most {MAX_PROFILE_NAME_CHARS} characters"));
    }
    if about.chars().count() > MAX_ABOUT_CHARS {
        return Err(format!("an about text is at most {MAX_ABOUT_CHARS} characters"));
    }
    if name.chars().chain(about.chars()).any(char::is_control) {
        return Err("a profile has no control characters (line breaks included)".into());
    }
    Ok((name.to_owned(), about.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_trimmed_and_bounded() {
        assert_eq!(clean_profile("  Ana ", " hi "), Ok(("Ana".into(), "hi".into())));
        assert!(clean_profile(&"é".repeat(25), &"x".repeat(139)).is_ok(), "counted in characters");
        assert!(clean_profile(&"é".repeat(26), "").is_err());
        assert!(clean_profile("", &"x".repeat(140)).is_err());
        assert!(clean_profile("a\nb", "").is_err());
    }

    #[test]
    fn device_names() {
        assert_eq!(clean_device_name("  laptop ").unwrap(), "laptop");
        assert_eq!(clean_device_name("").unwrap(), "device");
        assert!(clean_device_name("a\nb").is_err());
        assert!(clean_device_name(&"x".repeat(65)).is_err());
    }
}

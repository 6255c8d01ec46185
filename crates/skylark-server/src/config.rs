//! Server configuration: every limit in one place, with the defaults a
//! single-node server starts with. Loaded from TOML by the binary and
//! overridden by flags and environment (see README.md).

use crate::devices::DevicesConfig;
use crate::messaging::MessagingConfig;
use crate::push::PushConfig;
use serde::{Deserialize, Serialize};
use skylark_core::verification::VerificationPolicy;
use std::collections::BTreeMap;

/// The services' settings. The gateway owns the transport's (addresses,
/// TLS, frame and connection limits); the binary reads both from one file
/// (`skylark_gateway::config::Settings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub limits: Limits,
    pub verification: VerificationPolicy,
    pub rate_limits: RateLimits,
    pub messaging: MessagingConfig,
    pub devices: DevicesConfig,
    pub push: PushConfig,
    pub sms: SmsConfig,
    pub media: crate::media::MediaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            verification: VerificationPolicy::default(),
            rate_limits: RateLimits::default(),
            messaging: MessagingConfig::default(),
            devices: DevicesConfig::default(),
            push: PushConfig::default(),
            sms: SmsConfig::Console,
            media: crate::media::MediaConfig::default(),
        }
    }
}

/// The services' timing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// How long a connection's challenge nonce stays valid.
    pub challenge_ttl_ms: u64,
    /// How long a typing indicator lasts unless the typist refreshes it.
    pub typing_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { challenge_ttl_ms: 15_000, typing_ttl_ms: 10_000 }
    }
}

/// `burst` actions at once, then one more every `per_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub burst: u32,
    pub per_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Verification sessions started or codes resent, per phone number.
    pub sms_per_number: Quota,
    /// The same, per client IP address.
    pub sms_per_ip: Quota,
    /// The same, per number prefix (see `prefix_digits`), against SMS pumping
    /// aimed at one number range.
    pub sms_per_prefix: Quota,
    /// Digits after "+" that make a prefix.
    pub prefix_digits: usize,
    /// Code checks per phone number (across sessions).
    pub checks_per_number: Quota,
    /// Code checks per client IP address.
    pub checks_per_ip: Quota,
    /// Messages sent per device (and marks-read, which also travel).
    pub messages_per_device: Quota,
    /// Group creations and changes (members, admins, subject) per device.
    pub group_changes_per_device: Quota,
    /// Typing notifications per device; past it they are dropped silently
    /// (they are never answered).
    pub typing_per_device: Quota,
    /// Claims of key packages per device (each takes one package of every
    /// device of the account claimed; a claim of several numbers counts one
    /// per number).
    pub key_claims_per_device: Quota,
    /// Uploads of key packages per device.
    pub key_uploads_per_device: Quota,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            sms_per_number: Quota { burst: 3, per_ms: 10 * 60_000 },
            sms_per_ip: Quota { burst: 10, per_ms: 60_000 },
            sms_per_prefix: Quota { burst: 100, per_ms: 1_000 },
            prefix_digits: 6,
            checks_per_number: Quota { burst: 10, per_ms: 60_000 },
            checks_per_ip: Quota { burst: 30, per_ms: 10_000 },
            messages_per_device: Quota { burst: 1_000, per_ms: 10 },
            group_changes_per_device: Quota { burst: 30, per_ms: 2_000 },
            typing_per_device: Quota { burst: 20, per_ms: 500 },
            key_claims_per_device: Quota { burst: 60, per_ms: 1_000 },
            key_uploads_per_device: Quota { burst: 10, per_ms: 60_000 },
        }
    }
}

/// Where verification codes go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum SmsConfig {
    /// Print codes in the server log (development and the walkthrough).
    Console,
    /// POST JSON `{"to", "text", "code"}` to `url` with the given headers.
    Http {
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default = "default_sms_timeout")]
        timeout_ms: u64,
    },
}

fn default_sms_timeout() -> u64 {
    5_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_config_keeps_defaults() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "limits": { "typing_ttl_ms": 5000 },
            "sms": { "provider": "http", "url": "http://127.0.0.1:9000/send",
                     "headers": { "Authorization": "Bearer x" } }
        }))
        .unwrap();
        assert_eq!(config.limits.typing_ttl_ms, 5000);
        assert_eq!(config.limits.challenge_ttl_ms, Limits::default().challenge_ttl_ms);
        assert!(matches!(config.sms, SmsConfig::Http { timeout_ms: 5_000, .. }));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_value::<Config>(serde_json::json!({ "limitz": {} })).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}

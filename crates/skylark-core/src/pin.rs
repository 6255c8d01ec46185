//! Two-step verification (the registration lock): an account may set a
//! PIN, and re-registering its number then needs that PIN as well as the
//! SMS code — while the account is in use. The rules, without IO: what a
//! PIN is, how long a guesser waits after each wrong one, when it is locked
//! out, and when the lock lapses. The server keeps a [`PinRecord`] per
//! account and hashes PINs with a deliberately slow hash (Argon2id).

use serde::{Deserialize, Serialize};

/// A PIN is this many digits (as WhatsApp's two-step verification).
pub const PIN_DIGITS: usize = 6;
/// Wrong PINs in a row after which no more are taken: the number stays
/// locked until the lock lapses (its owner not using the account for the
/// lapse period) or the owner changes or removes the PIN.
pub const MAX_FAILURES: u32 = 10;
/// Wrong PINs in a row that cost no wait.
pub const FREE_FAILURES: u32 = 3;
/// The longest wait between two guesses.
pub const MAX_WAIT_MS: u64 = 24 * 3_600_000;

/// Whether `pin` has the form of a PIN (it may still be the wrong one).
pub fn valid_pin(pin: &str) -> bool {
    pin.len() == PIN_DIGITS && pin.bytes().all(|b| b.is_ascii_digit())
}

/// How long after the last of `failures` wrong PINs in a row the next
/// guess is taken: none for the first three, then a minute, growing four
/// times with each further one (4, 16, 64 minutes, …), at most a day.
pub fn wait_after(failures: u32) -> u64 {
    match failures.checked_sub(FREE_FAILURES) {
        None => 0,
        Some(n) => 4u64.checked_pow(n).map_or(MAX_WAIT_MS, |f| f.saturating_mul(60_000).min(MAX_WAIT_MS)),
    }
}

/// An account's PIN as the server keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The PIN's Argon2id hash, as a PHC string (its salt and parameters
    /// included). Never the PIN.
    pub hash: String,
    pub set_at_ms: u64,
    /// Wrong PINs since the last right one (or since it was set).
    pub failures: u32,
    pub last_failure_ms: u64,
}

/// What a guess may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guess {
    /// Check it.
    Allowed,
    /// Too soon after the last wrong one: wait this long.
    Wait(u64),
    /// Too many wrong ones: no more are taken.
    LockedOut,
}

impl PinRecord {
    pub fn new(hash: String, now_ms: u64) -> PinRecord {
        PinRecord { hash, set_at_ms: now_ms, failures: 0, last_failure_ms: 0 }
    }

    /// Whether a guess may be checked at `now_ms`.
    pub fn guess(&self, now_ms: u64) -> Guess {
        if self.failures >= MAX_FAILURES {
            return Guess::LockedOut;
        }
        let next = self.last_failure_ms.saturating_add(wait_after(self.failures));
        if self.failures > 0 && now_ms < next { Guess::Wait(next - now_ms) } else { Guess::Allowed }
    }

    /// Records a wrong guess; answers how many are left before the lock-out.
    pub fn failed(&mut self, now_ms: u64) -> u32 {
        self.failures = self.failures.saturating_add(1);
        self.last_failure_ms = now_ms;
        MAX_FAILURES.saturating_sub(self.failures)
    }
}

/// Until when the lock holds: `lapse_ms` after the account was last used
/// (`last_active_ms`, the newest of its devices' activity and the PIN's
/// own setting). Past it, the number can be registered with the SMS code
/// alone, and the old PIN goes.
pub fn lapses_at(record: &PinRecord, last_active_ms: u64, lapse_ms: u64) -> u64 {
    last_active_ms.max(record.set_at_ms).saturating_add(lapse_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_six_digits() {
        assert!(valid_pin("012345"));
        for bad in ["12345", "1234567", "12345a", "", "１２３４５６", " 12345"] {
            assert!(!valid_pin(bad), "{bad:?}");
        }
    }

    #[test]
    fn waits_grow_after_three_free_failures_up_to_a_day() {
        let waits: Vec<u64> = (0..12).map(wait_after).collect();
        assert_eq!(&waits[..7], &[0, 0, 0, 60_000, 240_000, 960_000, 3_840_000]);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(wait_after(9), MAX_WAIT_MS);
        assert_eq!(wait_after(u32::MAX), MAX_WAIT_MS);
    }

    #[test]
    fn guesses_wait_then_lock_out() {
        let mut r = PinRecord::new("h".into(), 0);
        assert_eq!(r.guess(1), Guess::Allowed);
        for i in 0..3 {
            assert_eq!(r.guess(10 + i), Guess::Allowed);
            r.failed(10 + i);
        }
        assert_eq!(r.guess(13), Guess::Wait(60_000 - 1));
        assert_eq!(r.guess(12 + 60_000), Guess::Allowed);
        assert_eq!(r.failed(12 + 60_000), 6);
        assert_eq!(r.guess(12 + 60_000 + 239_999), Guess::Wait(1));
        r.failures = MAX_FAILURES;
        assert_eq!(r.guess(u64::MAX), Guess::LockedOut, "no wait ends a lock-out");
    }

    #[test]
    fn the_lock_lapses_after_inactivity() {
        let r = PinRecord::new("h".into(), 1_000);
        assert_eq!(lapses_at(&r, 0, 7), 1_007, "setting the PIN counts as activity");
        assert_eq!(lapses_at(&r, 5_000, 7), 5_007);
    }
}

//! The phone verification session, as a state machine with no IO.
//!
//! A session belongs to one phone number. It holds the current code, when it
//! was issued, how many wrong guesses it has taken and how many codes were
//! sent. Each code expires after `code_ttl_ms` and tolerates at most
//! `max_attempts` wrong guesses; a resend issues a new code (with fresh
//! attempts) no sooner than `resend_interval_ms` after the last one and at
//! most `max_sends` times in all. The caller persists the session after every
//! transition.

use crate::phone::PhoneNumber;
use serde::{Deserialize, Serialize};

/// The rules a verification session follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerificationPolicy {
    /// How long a code is valid after it is sent.
    pub code_ttl_ms: u64,
    /// Wrong guesses allowed per code.
    pub max_attempts: u32,
    /// The least time between two codes of one session.
    pub resend_interval_ms: u64,
    /// Codes sent per session, the first included.
    pub max_sends: u32,
    /// Two-step verification: how long an account must go unused (no device connected) before its PIN no longer guards its number (7 days).
    pub pin_lapse_ms: u64,
}

impl Default for VerificationPolicy {
    fn default() -> Self {
        Self {
            code_ttl_ms: 10 * 60_000,
            max_attempts: 5,
            resend_interval_ms: 30_000,
            max_sends: 5,
            pin_lapse_ms: 7 * 86_400_000,
        }
    }
}

/// Whether the SMS for the current code reached the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    Pending,
    Sent,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationSession {
    pub id: String,
    pub phone: PhoneNumber,
    code: String,
    pub code_issued_at_ms: u64,
    pub wrong_attempts: u32,
    pub sends: u32,
    pub created_at_ms: u64,
    pub delivery: Delivery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResendError {
    #[error("a new code can be sent in {}", crate::words::wait(*retry_after_ms))]
    TooSoon { retry_after_ms: u64 },
    #[error("no more codes can be sent for this session")]
    TooManySends,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("the code expired")]
    Expired,
    #[error("too many wrong attempts for this code")]
    AttemptsExhausted,
    #[error("wrong code; {}", crate::words::count(u64::from(*attempts_left), "attempt", "attempts") + " left")]
    WrongCode { attempts_left: u32 },
}

impl VerificationSession {
    pub fn start(id: String, phone: PhoneNumber, code: String, now_ms: u64) -> Self {
        Self {
            id,
            phone,
            code,
            code_issued_at_ms: now_ms,
            wrong_attempts: 0,
            sends: 1,
            created_at_ms: now_ms,
            delivery: Delivery::Pending,
        }
    }

    /// The current code, for handing to the SMS provider.
    pub fn code(&self) -> &str {
        &self.code
    }

    pub fn code_expires_at_ms(&self, policy: &VerificationPolicy) -> u64 {
        self.code_issued_at_ms.saturating_add(policy.code_ttl_ms)
    }

    /// When the next resend is allowed, or `None` if no more are.
    pub fn next_resend_at_ms(&self, policy: &VerificationPolicy) -> Option<u64> {
        (self.sends < policy.max_sends).then(|| self.code_issued_at_ms.saturating_add(policy.resend_interval_ms))
    }

    /// Replaces the code with `new_code` if the policy allows a resend now.
    pub fn resend(&mut self, new_code: String, now_ms: u64, policy: &VerificationPolicy) -> Result<(), ResendError> {
        let next = self.next_resend_at_ms(policy).ok_or(ResendError::TooManySends)?;
        if now_ms < next {
            return Err(ResendError::TooSoon { retry_after_ms: next - now_ms });
        }
        self.code = new_code;
        self.code_issued_at_ms = now_ms;
        self.wrong_attempts = 0;
        self.sends += 1;
        self.delivery = Delivery::Pending;
        Ok(())
    }

    /// Checks a guess. A wrong guess is counted (the caller must persist).
    pub fn check(&mut self, guess: &str, now_ms: u64, policy: &VerificationPolicy) -> Result<(), CheckError> {
        if now_ms > self.code_expires_at_ms(policy) {
            return Err(CheckError::Expired);
        }
        if self.wrong_attempts >= policy.max_attempts {
            return Err(CheckError::AttemptsExhausted);
        }
        if constant_time_eq(guess.trim().as_bytes(), self.code.as_bytes()) {
            return Ok(());
        }
        self.wrong_attempts += 1;
        match policy.max_attempts - self.wrong_attempts {
            0 => Err(CheckError::AttemptsExhausted),
            attempts_left => Err(CheckError::WrongCode { attempts_left }),
        }
    }

    /// A session nobody can use any more: its code expired and no resend is left.
    pub fn is_finished(&self, now_ms: u64, policy: &VerificationPolicy) -> bool {
        now_ms > self.code_expires_at_ms(policy) && self.next_resend_at_ms(policy).is_none()
    }
}

/// Compares without an early exit, so timing tells nothing about how many
/// leading digits of a guess were right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (VerificationSession, VerificationPolicy) {
        let phone = PhoneNumber::parse("+15551234567").unwrap();
        (VerificationSession::start("s".into(), phone, "123456".into(), 0), VerificationPolicy::default())
    }

    #[test]
    fn right_code_passes() {
        let (mut s, p) = session();
        assert_eq!(s.check(" 123456 ", 1_000, &p), Ok(()));
    }

    #[test]
    fn five_wrong_attempts_exhaust_the_code() {
        let (mut s, p) = session();
        for left in (1..5).rev() {
            assert_eq!(s.check("000000", 1, &p), Err(CheckError::WrongCode { attempts_left: left }));
        }
        assert_eq!(s.check("000000", 1, &p), Err(CheckError::AttemptsExhausted));
        // Even the right code is refused now.
        assert_eq!(s.check("123456", 1, &p), Err(CheckError::AttemptsExhausted));
    }

    #[test]
    fn code_expires_after_ten_minutes() {
        let (mut s, p) = session();
        assert_eq!(s.check("123456", 10 * 60_000 + 1, &p), Err(CheckError::Expired));
    }

    #[test]
    fn resend_rules() {
        let (mut s, p) = session();
        assert_eq!(s.resend("222222".into(), 10_000, &p), Err(ResendError::TooSoon { retry_after_ms: 20_000 }));
        s.check("0", 1, &p).unwrap_err();
        let mut t = 30_000;
        for _ in 1..p.max_sends {
            s.resend("222222".into(), t, &p).unwrap();
            t += 30_000;
        }
        assert_eq!(s.wrong_attempts, 0, "a new code gets fresh attempts");
        assert_eq!(s.resend("333333".into(), t, &p), Err(ResendError::TooManySends));
        assert_eq!(s.check("123456", t, &p), Err(CheckError::WrongCode { attempts_left: 4 }));
        assert_eq!(s.check("222222", t, &p), Ok(()));
        assert!(s.is_finished(t + p.code_ttl_ms + 1, &p));
    }
}

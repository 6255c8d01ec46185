//! Quantities as people read them in messages: "3 seconds", "1 attempt".
//! Error messages that reach users go through these, never raw
//! milliseconds or a Rust type's name.

/// `n` of something, singular or plural.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A wait, rounded up to what a person would wait for: seconds under two
/// minutes, then minutes, then hours.
pub fn wait(ms: u64) -> String {
    let secs = ms.div_ceil(1000).max(1);
    if secs < 120 {
        count(secs, "second", "seconds")
    } else if secs < 2 * 3600 {
        count(secs.div_ceil(60), "minute", "minutes")
    } else if secs < 2 * 86_400 {
        count(secs.div_ceil(3600), "hour", "hours")
    } else {
        count(secs.div_ceil(86_400), "day", "days")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_counts_read_as_words() {
        assert_eq!(wait(22_157), "23 seconds");
        assert_eq!(wait(1), "1 second");
        assert_eq!(wait(0), "1 second", "never \"0 seconds\" for a wait that is not over");
        assert_eq!(wait(600_000), "10 minutes");
        assert_eq!(wait(3 * 3_600_000), "3 hours");
        assert_eq!(wait(7 * 86_400_000), "7 days");
        assert_eq!(count(1, "attempt", "attempts"), "1 attempt");
        assert_eq!(count(4, "attempt", "attempts"), "4 attempts");
    }

    #[test]
    fn verification_errors_say_it_in_words() {
        use crate::verification::{CheckError, ResendError};
        assert_eq!(ResendError::TooSoon { retry_after_ms: 22_157 }.to_string(), "a new code can be sent in 23 seconds");
        assert_eq!(CheckError::WrongCode { attempts_left: 1 }.to_string(), "wrong code; 1 attempt left");
    }
}

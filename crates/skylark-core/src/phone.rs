//! Phone numbers in E.164 form.
//!
//! Skylark accepts numbers in international form only ("+" or "00", then the
//! country code), with common separators, and keeps them as "+" and 8 to 15
//! digits. It does not check numbering plans per country: an unreachable but
//! well-formed number simply never receives its code.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A normalised E.164 phone number, such as `+15551234567`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number must start with + or 00 and the country code")]
    NotInternational,
    #[error("phone number contains a character that is not a digit or separator")]
    BadCharacter,
    #[error("phone number must have 8 to 15 digits")]
    BadLength,
    #[error("country codes never start with 0")]
    LeadingZero,
}

impl PhoneNumber {
    /// Normalises user input ("+1 (555) 123-4567", "0044 20 7946 0000") to E.164.
    pub fn parse(input: &str) -> Result<Self, PhoneError> {
        let trimmed = input.trim();
        let rest = if let Some(r) = trimmed.strip_prefix('+') {
            r
        } else if let Some(r) = trimmed.strip_prefix("00") {
            r
        } else {
            return Err(PhoneError::NotInternational);
        };
        let mut digits = String::with_capacity(16);
        for c in rest.chars() {
            match c {
                '0'..='9' => {
                    if digits.len() == 15 {
                        return Err(PhoneError::BadLength);
                    }
                    digits.push(c);
                }
                ' ' | '-' | '.' | '(' | ')' => {}
                _ => return Err(PhoneError::BadCharacter),
            }
        }
        if digits.len() < 8 {
            return Err(PhoneError::BadLength);
        }
        if digits.starts_with('0') {
            return Err(PhoneError::LeadingZero);
        }
        Ok(Self(format!("+{digits}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first `digits` digits after the "+", used to rate-limit abuse
    /// aimed at one country or number range (SMS pumping).
    pub fn prefix(&self, digits: usize) -> &str {
        let end = (1 + digits).min(self.0.len());
        &self.0[..end]
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PhoneNumber {
    type Err = PhoneError;
    fn from_str(s: &str) -> Result<Self, PhoneError> {
        Self::parse(s)
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = PhoneError;
    fn try_from(s: String) -> Result<Self, PhoneError> {
        Self::parse(&s)
    }
}

impl From<PhoneNumber> for String {
    fn from(p: PhoneNumber) -> String {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_common_forms() {
        assert_eq!(PhoneNumber::parse("+1 (555) 123-4567").unwrap().as_str(), "+15551234567");
        assert_eq!(PhoneNumber::parse("0044 20 7946 0000").unwrap().as_str(), "+442079460000");
        assert_eq!(PhoneNumber::parse(" +49.30.123456 ").unwrap().as_str(), "+4930123456");
    }

    #[test]
    fn refuses_bad_numbers() {
        assert_eq!(PhoneNumber::parse("5551234567"), Err(PhoneError::NotInternational));
        assert_eq!(PhoneNumber::parse("+1555abc4567"), Err(PhoneError::BadCharacter));
        assert_eq!(PhoneNumber::parse("+1234567"), Err(PhoneError::BadLength));
        assert_eq!(PhoneNumber::parse("+1234567890123456"), Err(PhoneError::BadLength));
        assert_eq!(PhoneNumber::parse("+0123456789"), Err(PhoneError::LeadingZero));
    }

    #[test]
    fn prefix_is_clamped() {
        let p = PhoneNumber::parse("+15551234567").unwrap();
        assert_eq!(p.prefix(4), "+1555");
        assert_eq!(p.prefix(40), "+15551234567");
    }
}

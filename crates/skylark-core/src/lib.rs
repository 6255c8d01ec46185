//! Skylark's domain: accounts, devices, phone numbers, verification sessions
//! and device authentication, as plain types and state machines.
//!
//! Nothing here does IO or reads a clock by itself: time comes in as an
//! argument (see [`clock`]), so every rule is testable without sockets,
//! disks or sleeps. This crate must not know about storage engines, network
//! transports or wire encodings, and depends on no other Skylark crate.

pub mod account;
pub mod auth;
pub mod clock;
pub mod group;
pub mod keys;
pub mod message;
pub mod phone;
pub mod pin;
pub mod verification;
pub mod words;

pub use account::{Account, AccountId, Device, DeviceId, NewDevice};
pub use clock::{Clock, ManualClock, SystemClock};
pub use phone::PhoneNumber;

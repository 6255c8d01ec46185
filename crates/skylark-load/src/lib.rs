//! `skylark-load`: the load generator, built on the client SDK.
//!
//! - [`provision`] writes N accounts with deterministic device keys straight
//!   into a (stopped) server's data directory, plus a manifest, so a load
//!   test needs no SMS round trips.
//! - [`scenarios`]: `idle` (many authenticated connections, server memory
//!   per connection), `chat` (open-loop 1:1 traffic with latency
//!   histograms corrected for coordinated omission), `backlog` (messages
//!   stored for offline devices, then drained), `storm` (kill -9 and restart
//!   the server under clients, with a ledger of acknowledged messages).
//! - [`stats`]: HDR histograms and the JSON report.
//!
//! It talks to the server only through the protocol, like any client.

pub mod e2ee;
pub mod provision;
pub mod scenarios;
pub mod stats;

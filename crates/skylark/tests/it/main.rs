//! Black-box tests: a real server on 127.0.0.1:0, driven through the client
//! SDK (and raw frames where a test must misbehave) over every transport.

// This whole crate is test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod account;
mod admin;
mod auth;
mod authz;
mod blocks;
mod cli;
mod cluster;
mod conversation;
mod crash;
mod devices;
mod docs;
mod e2ee;
mod frames;
mod groups;
mod harness;
mod keys;
mod lifecycle;
mod limits;
mod media;
mod messaging;
mod pin;
mod power;
mod presence;
mod push;
mod signup;
mod store;
mod tls;
mod web;

//! Unit tests of the machine: no runtime, no store.

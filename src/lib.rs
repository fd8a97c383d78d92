#![recursion_limit = "256"]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
//! rollcall: bulk user management on one's own hardware. See docs/ARCHITECTURE.md for the map.

pub mod admin;
pub mod audit;
pub mod bench;
pub mod bulk;
pub mod cli;
pub mod config;
pub mod confine;
pub mod db;
pub mod error;
pub mod inbox;
pub mod mail;
pub mod model;
pub mod ops;
pub mod priority;
pub mod rules;
pub mod scheduler;
pub mod serve;
pub mod service;
pub mod settings;
pub mod sheet;
pub mod tasks;
pub mod undo;
pub mod web;

/// For tests that generate their inputs: numbers below `n`, the same from the same (non-zero)
/// seed on every run (xorshift), so a failure can be reproduced.
#[cfg(test)]
pub(crate) fn test_random(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

//! Load-test support: the baselines `make bench` compares Turnpike against,
//! and the read-heavy chat profile `make loadtest` runs with its accounting.

pub mod accounting;
pub mod profile;

//! Black-box tests of the api against a real topology: Postgres primary and
//! two streaming replicas, PgBouncer, Redis. One test binary per crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod api;

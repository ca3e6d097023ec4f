//! Integration-test support: the in-repo delta-ADS control plane (also run by the local demo)
//! and helpers for whole-app tests.

pub mod http;
pub mod xds_server;

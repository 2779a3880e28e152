//! Portcullis: a least-privilege authorization service for Envoy's ext_authz API.
//!
//! See ARCHITECTURE.md for the module map and its invariants.

pub mod admin;
pub mod authz;
pub mod config;
pub mod decide;
pub mod identity;
pub mod keys;

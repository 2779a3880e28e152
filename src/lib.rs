//! Portcullis: a least-privilege authorization service for Envoy's ext_authz API.
//!
//! See ARCHITECTURE.md for the module map and its invariants.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod authz;
pub mod cli;
pub mod config;
pub mod decide;
pub mod engine;
pub mod grpc;
pub mod identity;
pub mod keys;
pub mod listener;
pub mod policytest;
pub mod ratelimit;
pub mod reload;
pub mod revocation;
pub mod server;
pub mod state;
pub mod tls;

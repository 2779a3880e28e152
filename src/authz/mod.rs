//! The decision core: compiled routes and rules, path hygiene, `match_route` and `authorize`.
//!
//! Pure and synchronous. Never imports tonic, envoy_types, tokio, moka or tracing; never reads
//! the clock. Deny by default: anything not granted by a route is denied.
//! OWNER: policy helper for `policy.rs`/`path.rs`; the types in `decision.rs`/`request.rs`
//! are the shared contract.

pub mod decision;
pub mod request;

use std::sync::Arc;

pub use decision::{Decision, ReasonCode};
pub use request::RequestView;

use crate::identity::Identity;

/// The compiled route table.
#[derive(Debug, Default)]
pub struct Policy {}

/// A matched route with its captured path parameters.
#[derive(Debug)]
pub struct RouteMatch<'p> {
    pub route_id: &'p Arc<str>,
    pub public: bool,
    pub params: Vec<(&'p str, String)>,
}

impl Policy {
    /// Path hygiene, then host + method + path matching (most specific wins).
    /// `Err` is the deny decision (`PathRejected` or `NoRoute`).
    pub fn match_route<'p>(&'p self, _req: &RequestView<'_>) -> Result<RouteMatch<'p>, Decision> {
        todo!("policy helper")
    }

    /// Evaluates the matched route's rules for a verified identity.
    pub fn authorize(&self, _m: &RouteMatch<'_>, _identity: &Arc<Identity>) -> Decision {
        todo!("policy helper")
    }
}

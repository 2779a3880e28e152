//! The decision core: compiled routes and rules, path hygiene, `match_route` and `authorize`.
//!
//! Pure and synchronous. Never imports tonic, envoy_types, tokio, moka or tracing; never reads
//! the clock. Deny by default: anything not granted by a route is denied.
//! OWNER: policy helper for `policy.rs`/`path.rs`; the types in `decision.rs`/`request.rs`
//! are the shared contract.

pub mod context;
pub mod decision;
pub mod path;
pub mod policy;
pub mod request;

pub use context::Context;
pub use decision::{Decision, DryRun, ReasonCode};
pub use policy::{Policy, RouteMatch};
pub use request::{Headers, RequestView};

//! Admin HTTP listener: /healthz, /readyz, /metrics.

pub mod metrics;

//! The Envoy dynamic module of `bench/module`, built for the tests and put in place of the
//! ext_authz filter of a shipped Envoy config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::repo_root;
use super::stack::Envoy;

/// Builds `bench/module` (debug) once per test process and answers the `.so`'s path.
pub fn module_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Command::new(env!("CARGO"))
                .args(["build", "-p", "portcullis-envoy-module"])
                .current_dir(repo_root())
                .output()
                .expect("run cargo to build bench/module");
            assert!(
                out.status.success(),
                "building bench/module failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"));
            let lib = target.join("debug/libportcullis_envoy_module.so");
            assert!(lib.exists(), "{} was not built", lib.display());
            lib
        })
        .clone()
}

/// The shipped `envoy/envoy.yaml` with its ext_authz filter replaced by the module, which
/// reads the Portcullis config at `config`. Everything else (early header removals, path
/// normalization, the upstream cluster) stays as shipped.
pub fn with_module(shipped: &str, config: &Path) -> String {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(shipped).unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence_mut()
        .unwrap();
    let ext_authz = filters
        .iter()
        .position(|f| f["name"] == "envoy.filters.http.ext_authz")
        .expect("envoy.yaml has an ext_authz filter");
    filters[ext_authz] = serde_yaml::from_str(&format!(
        r#"
name: portcullis
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
  dynamic_module_config:
    module: {{local: {{filename: "{}"}}}}
    do_not_close: true
  filter_name: portcullis
  filter_config:
    "@type": type.googleapis.com/google.protobuf.StringValue
    value: "{}"
"#,
        module_library().display(),
        config.display()
    ))
    .unwrap();
    serde_yaml::to_string(&doc).unwrap()
}

/// The shipped `envoy/envoy.yaml` (its ports rewritten) with the module in place of its
/// ext_authz filter, reading the Portcullis config at `config`.
pub fn shipped_envoy_with_module(dir: &Path, upstream_port: u16, config: &Path) -> Envoy {
    Envoy::start_shipped(
        dir,
        "envoy/envoy.yaml",
        10000,
        super::free_port(),
        upstream_port,
        |shipped| with_module(shipped, config),
    )
}

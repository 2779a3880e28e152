//! The Envoy dynamic module (`module/`), built for the tests, and the shipped
//! `envoy/envoy-module.yaml` that loads it, pointed at the test build and a test config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_yaml::Value;

use super::repo_root;
use super::stack::Envoy;

/// The shipped Envoy config that runs Portcullis inside Envoy.
pub const SHIPPED: &str = "envoy/envoy-module.yaml";

/// The Kubernetes gateway's ConfigMap: Envoy's config (`envoy.yaml`, the listener of
/// [`SHIPPED`]) and Portcullis's (`portcullis.yaml`), as `module/Dockerfile`'s image reads them.
pub const GATEWAY: &str = "deploy/kubernetes/module/configmap.yaml";

/// The gateway's Deployment: how its image runs Envoy.
pub const GATEWAY_DEPLOYMENT: &str = "deploy/kubernetes/module/deployment.yaml";

/// The `@type` of Envoy's dynamic-module HTTP filter.
pub const FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// The text of `key` (`envoy.yaml` or `portcullis.yaml`) in the gateway's ConfigMap, whose
/// text is `configmap`.
pub fn gateway_file(configmap: &str, key: &str) -> String {
    let doc: Value = serde_yaml::from_str(configmap).unwrap();
    doc["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{GATEWAY} has no data.{key}"))
        .to_string()
}

/// Builds `module/` (debug) once per test process and answers the `.so`'s path.
pub fn module_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Command::new(env!("CARGO"))
                .args(["build", "-p", "portcullis-envoy-module"])
                .current_dir(repo_root())
                .output()
                .expect("run cargo to build module/");
            assert!(
                out.status.success(),
                "building module/ failed:\n{}",
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

/// The HTTP filters of a parsed Envoy config's first listener.
pub fn http_filters(doc: &mut Value) -> &mut Vec<Value> {
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"]
        .as_sequence_mut()
        .unwrap()
}

/// The Portcullis filter exactly as `envoy/envoy-module.yaml` ships it, except that it loads
/// the test build of the module (by path, where the shipped file finds it by name in
/// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`) and reads the Portcullis config at `config`.
fn shipped_filter(config: &Path) -> Value {
    let mut doc: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join(SHIPPED)).unwrap()).unwrap();
    let mut filter = http_filters(&mut doc)
        .iter()
        .find(|f| f["name"] == "portcullis")
        .expect("envoy-module.yaml has the portcullis filter")
        .clone();
    let library = module_library();
    let module = filter["typed_config"]["dynamic_module_config"]
        .as_mapping_mut()
        .unwrap();
    let name = module.remove("name").unwrap();
    assert_eq!(
        Some(format!("lib{}.so", name.as_str().unwrap()).as_str()),
        library.file_name().and_then(|n| n.to_str()),
        "the shipped module name must be the library cargo builds"
    );
    module.insert(
        "module".into(),
        serde_yaml::from_str(&format!("{{local: {{filename: '{}'}}}}", library.display())).unwrap(),
    );
    filter["typed_config"]["filter_config"]["value"] = config.display().to_string().into();
    filter
}

/// A shipped ext_authz Envoy config (`envoy/envoy.yaml`, `envoy/envoy-mtls.yaml`) with its
/// ext_authz filter replaced by the shipped module filter, which reads the Portcullis config
/// at `config`. Everything else (early header removals, path normalization, TLS, the
/// upstream cluster) stays as shipped.
pub fn with_module(shipped: &str, config: &Path) -> String {
    let mut doc: Value = serde_yaml::from_str(shipped).unwrap();
    let filters = http_filters(&mut doc);
    let ext_authz = filters
        .iter()
        .position(|f| f["name"] == "envoy.filters.http.ext_authz")
        .expect("the config has an ext_authz filter");
    filters[ext_authz] = shipped_filter(config);
    serde_yaml::to_string(&doc).unwrap()
}

/// The text of the shipped `envoy/envoy-module.yaml` loading the test build of the module
/// with the Portcullis config at `config`.
pub fn shipped_module_config(config: &Path) -> String {
    let shipped = std::fs::read_to_string(repo_root().join(SHIPPED)).unwrap();
    test_build(&shipped, config)
}

/// `shipped` (the text of `envoy/envoy-module.yaml`) with its Portcullis filter loading the
/// test build and reading `config`.
fn test_build(shipped: &str, config: &Path) -> String {
    let mut doc: Value = serde_yaml::from_str(shipped).unwrap();
    let filters = http_filters(&mut doc);
    let at = filters
        .iter()
        .position(|f| f["name"] == "portcullis")
        .unwrap();
    filters[at] = shipped_filter(config);
    serde_yaml::to_string(&doc).unwrap()
}

/// The gateway's Envoy config from [`GATEWAY`] (ports rewritten, the app's Service to the
/// loopback `upstream_port`), loading the test build of the module with the Portcullis config
/// at `config`.
pub fn gateway_envoy_with_module(dir: &Path, upstream_port: u16, config: &Path) -> Envoy {
    gateway_envoy_with_flags(dir, upstream_port, config, &gateway_envoy_flags())
}

/// [`gateway_envoy_with_module`], run with the command-line flags `flags` (rather than
/// the Deployment's).
pub fn gateway_envoy_with_flags(
    dir: &Path,
    upstream_port: u16,
    config: &Path,
    flags: &[String],
) -> Envoy {
    Envoy::start_shipped_with(
        dir,
        GATEWAY,
        10000,
        super::free_port(),
        upstream_port,
        |configmap| test_build(&gateway_file(configmap, "envoy.yaml"), config),
        flags,
    )
}

/// The gateway Deployment's flags for Envoy, less those every test Envoy sets its own way
/// (`-c`, `--concurrency`, `--disable-hot-restart`): what the gateway runs Envoy with.
pub fn gateway_envoy_flags() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(GATEWAY_DEPLOYMENT)).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{GATEWAY_DEPLOYMENT} gives Envoy no args"));
    let mut args = args.iter().map(|a| a.as_str().unwrap().to_string());
    let mut flags = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-c" | "--concurrency" => {
                args.next();
            }
            "--disable-hot-restart" => {}
            _ => flags.push(arg),
        }
    }
    flags
}

/// The drain helper built with the module (`module/src/bin/portcullis-envoy-drain.rs`), the
/// gateway's `preStop` hook.
pub fn drain_helper() -> PathBuf {
    let helper = module_library().with_file_name("portcullis-envoy-drain");
    assert!(helper.exists(), "{} was not built", helper.display());
    helper
}

/// The shipped `envoy/envoy-module.yaml` (ports rewritten), loading the test build of the
/// module with the Portcullis config at `config`.
pub fn shipped_envoy_with_module(dir: &Path, upstream_port: u16, config: &Path) -> Envoy {
    Envoy::start_shipped(
        dir,
        SHIPPED,
        10000,
        super::free_port(),
        upstream_port,
        |shipped| test_build(shipped, config),
    )
}

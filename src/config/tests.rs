//! Config loading and validation: every error names its field.

use std::path::{Path, PathBuf};

use super::*;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml")
}

#[test]
fn shipped_config_compiles_without_warnings() {
    let c = load(&shipped()).unwrap();
    assert_eq!(c.issuers.len(), 1);
    assert_eq!(&*c.issuers[0].name, "dev");
    assert_eq!(c.policy.routes().len(), 6);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let keys = c.issuers[0].keys.file.as_ref().unwrap();
    assert!(keys.is_file(), "{}", keys.display());
}

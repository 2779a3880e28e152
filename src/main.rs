//! The `portcullis` binary. Skeleton; the CLI is filled in by the shell work.
fn main() -> anyhow::Result<()> {
    Ok(())
}

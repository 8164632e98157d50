//! `verimail demo`: the quickstart walk-through (not written yet).

use verimail_shared::Config;

/// Runs the demo. Not implemented yet: says so and fails (exit 1).
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("not yet: `verimail demo` is still being written")
}

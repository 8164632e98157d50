//! `verimail migrate`: the embedded migrations, applied once.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use verimail_shared::Config;
use verimail_shared::db::{self, MIGRATOR, PoolSettings};

use super::Outcome;

/// Arguments of `verimail migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL (created if missing).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,
}

/// Runs `verimail migrate`.
pub async fn run(config: &Config, _args: MigrateArgs) -> Outcome {
    let settings = PoolSettings {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
    };
    let pool = db::connect(&config.database_url, false, settings)
        .await
        .context("cannot migrate")?;
    // What was there before, to say what this run applied. A fresh database
    // has no migrations table yet: nothing was applied.
    let before: HashSet<i64> =
        sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&pool)
            .await
            .map(|versions| versions.into_iter().collect())
            .unwrap_or_default();
    let migrated = db::migrate(&pool).await;
    pool.close().await;
    migrated.context("migration failed")?;
    let mut applied = 0;
    for migration in MIGRATOR.iter() {
        if !migration.migration_type.is_down_migration() && !before.contains(&migration.version) {
            eprintln!("applied {} {}", migration.version, migration.description);
            applied += 1;
        }
    }
    if applied == 0 {
        eprintln!("nothing to apply: the database is up to date");
    }
    Ok(())
}

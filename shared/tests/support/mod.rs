//! A database of a test's own on the machine's PostgreSQL, created and
//! migrated by verimail itself, and dropped afterwards.

use verimail_shared::db::{self, PoolSettings};

/// A new database named `vm_{label}_…`, created and migrated by
/// [`db::connect`]; its pool and name.
pub async fn fresh_db(label: &str) -> (sqlx::PgPool, String) {
    let name = format!(
        "vm_{label}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let pool = db::connect(&url, true, PoolSettings::default())
        .await
        .expect("database");
    (pool, name)
}

/// Drops the database `name` (its sessions closed by force).
pub async fn drop_db(name: &str) {
    if let Ok(admin) = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await;
    }
}

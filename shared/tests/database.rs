//! The database verimail creates for itself, against a real PostgreSQL.

use verimail_shared::db::{self, PoolSettings};

#[tokio::test]
async fn a_database_verimail_creates_compares_keys_byte_by_byte_and_lowercases_by_the_server() {
    let name = format!(
        "vm_created_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let pool = db::connect(&url, true, PoolSettings::default())
        .await
        .expect("database created and migrated");
    let (collate, ctype, template_ctype): (String, String, String) = sqlx::query_as(
        "SELECT d.datcollate, d.datctype, t.datctype FROM pg_database d, pg_database t \
         WHERE d.datname = current_database() AND t.datname = 'template0'",
    )
    .fetch_one(&pool)
    .await
    .expect("settings");
    assert_eq!(collate, "C");
    // lower() (the suppression list's index) follows LC_CTYPE: the server's own.
    assert_eq!(ctype, template_ctype);
    let (byte_order, lowered): (bool, String) =
        sqlx::query_as("SELECT 'Zed' < 'apple', lower('Ünïcode@EXAMPLE.com')")
            .fetch_one(&pool)
            .await
            .expect("comparison");
    assert!(byte_order, "'Z' (0x5A) sorts before 'a' (0x61) under C");
    if ctype.to_ascii_uppercase().contains("UTF") {
        assert_eq!(lowered, "ünïcode@example.com");
    }
    pool.close().await;
    if let Ok(admin) = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await;
    }
}

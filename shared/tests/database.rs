//! The database verimail creates for itself, against a real PostgreSQL.

mod support;
use support::{drop_db, fresh_db};

#[tokio::test]
async fn a_database_verimail_creates_compares_keys_byte_by_byte_and_lowercases_by_the_server() {
    let (pool, name) = fresh_db("created").await;
    let (collate, ctype, template_collate, template_ctype, provider): (
        String,
        String,
        String,
        String,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT d.datcollate, d.datctype, t.datcollate, t.datctype, \
                to_jsonb(t) ->> 'datlocprovider' \
         FROM pg_database d, pg_database t \
         WHERE d.datname = current_database() AND t.datname = 'template1'",
    )
    .fetch_one(&pool)
    .await
    .expect("settings");
    // lower() (the suppression list's index) follows LC_CTYPE: template1's, as
    // a plain CREATE DATABASE would have it.
    assert_eq!(ctype, template_ctype);
    if provider.is_some_and(|p| p != "c") {
        // ICU or builtin: LC_COLLATE does not choose the collation there, so
        // nothing was changed.
        assert_eq!(collate, template_collate);
        pool.close().await;
        drop_db(&name).await;
        return;
    }
    assert_eq!(collate, "C");
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
    drop_db(&name).await;
}

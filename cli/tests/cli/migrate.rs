//! `verimail migrate`: the embedded migrations, applied once, on a database
//! of the test's own.

use crate::common::namespace;
use crate::support::{TestDb, run, stderr, stdout};

#[tokio::test]
async fn migrate_applies_the_migrations_once() {
    let ns = namespace();
    let db = TestDb::new();
    let env = db.env();
    let first = run(&ns, &env, &["migrate"]).await;
    assert_eq!(first.status.code(), Some(0));
    assert!(
        stderr(&first).contains("applied 20261126000001"),
        "{}",
        stderr(&first)
    );
    let second = run(&ns, &env, &["migrate"]).await;
    assert_eq!(second.status.code(), Some(0));
    assert!(stderr(&second).contains("nothing to apply"));
    assert!(stdout(&second).is_empty());

    let unreachable = run(
        &ns,
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")],
        &["migrate"],
    )
    .await;
    assert_eq!(unreachable.status.code(), Some(1));

    db.remove().await;
}

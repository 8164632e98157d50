//! `verimail suppression add|list|remove`: one entry per address whatever
//! its case, on a database of the test's own.

use crate::common::namespace;
use crate::support::{TestDb, json_lines, run, stderr, stdout};

#[tokio::test]
async fn suppression_add_list_and_remove_keep_one_entry_per_address_in_any_case() {
    let ns = namespace();
    let db = TestDb::new();
    let env = db.env();

    let empty = run(&ns, &env, &["suppression", "list"]).await;
    assert_eq!(empty.status.code(), Some(0));
    assert!(stdout(&empty).is_empty());

    let added = run(&ns, &env, &["suppression", "add", "Alice@Example.com"]).await;
    assert_eq!(added.status.code(), Some(0));
    let entry = &json_lines(&added)[0];
    assert_eq!(entry["email"], "Alice@Example.com");
    assert_eq!(entry["reason"], "manual");
    assert_eq!(entry["source"], "cli");
    assert!(
        entry["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let bob = run(
        &ns,
        &env,
        &[
            "suppression",
            "add",
            "bob@example.com",
            "--reason",
            "complaint",
        ],
    )
    .await;
    assert_eq!(json_lines(&bob)[0]["reason"], "complaint");
    // Again, in another case: the entry stays as it was.
    let again = run(
        &ns,
        &env,
        &[
            "suppression",
            "add",
            "ALICE@example.com",
            "--reason",
            "bounce",
        ],
    )
    .await;
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(json_lines(&again)[0]["reason"], "manual");

    let all = run(&ns, &env, &["suppression", "list"]).await;
    let lines = json_lines(&all);
    assert_eq!(lines.len(), 2, "{}", stdout(&all));
    let keys: Vec<Vec<&String>> = lines
        .iter()
        .map(|l| {
            l.as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        keys.iter()
            .all(|k| k == &["created_at", "email", "reason", "source"])
    );
    let one = run(
        &ns,
        &env,
        &["suppression", "list", "--email", "alice@EXAMPLE.com"],
    )
    .await;
    assert_eq!(json_lines(&one).len(), 1);
    assert_eq!(json_lines(&one)[0]["email"], "Alice@Example.com");

    for bad in [
        vec!["suppression", "add", "not-an-address"],
        vec!["suppression", "add", "c@example.com", "--reason", "spam"],
        vec!["suppression", "remove"],
    ] {
        let out = run(&ns, &env, &bad).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }

    let removed = run(&ns, &env, &["suppression", "remove", "alice@example.com"]).await;
    assert_eq!(removed.status.code(), Some(0));
    let absent = run(&ns, &env, &["suppression", "remove", "alice@example.com"]).await;
    assert_eq!(absent.status.code(), Some(1));
    assert!(stderr(&absent).contains("not on the suppression list"));
    let left = run(&ns, &env, &["suppression", "list"]).await;
    assert_eq!(json_lines(&left).len(), 1);
    assert_eq!(json_lines(&left)[0]["email"], "bob@example.com");

    db.remove().await;
}

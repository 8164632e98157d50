//! Hostile requests published on the raw bus: each gets exactly its expected
//! answer (sent, failed naming the field, or dead-lettered), and nothing else
//! happens: no stray mail, no second outcome, no extra dead letter.

mod cases;
mod catalogue;

use std::time::{Duration, Instant};

use serde_json::Value;
use verimail_shared::events::{VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT};
use verimail_tests::procs::tail;
use verimail_tests::settle::settled;
use verimail_tests::smtp::{CapturedMail, mail_request};

use crate::WAIT;
use crate::support::{Pipeline, peek_dead};
use cases::{Case, Expect};
use catalogue::{hostile_requests, unstorable_requests};

/// Publishes `cases`, waits for each one's answer, and checks it is exactly
/// the expected one and that nothing else happened.
async fn run_cases(label: &str, cases: Vec<Case>) {
    let started = Instant::now();
    let p = Pipeline::start(label).await;
    for c in &cases {
        p.publish_raw(&c.id, &c.body).await;
    }
    let answered: Vec<&Case> = cases
        .iter()
        .filter(|c| !matches!(c.expect, Expect::Dead(..)))
        .collect();
    let dead_expected = cases.len() - answered.len();
    let outcome_of = |all: &[Value], id: &str| -> Vec<Value> {
        all.iter()
            .filter(|e| {
                e["data"]["request_id"] == id
                    && e["type"] != VERIFICATION_REQUESTED
                    && e["type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("verimail.verification."))
            })
            .cloned()
            .collect()
    };
    p.tap
        .wait_until(WAIT, |all| {
            answered.iter().all(|c| !outcome_of(all, &c.id).is_empty())
        })
        .await;
    let deadline = Instant::now() + WAIT;
    let mut dead = peek_dead(&p.env).await;
    while dead.len() < dead_expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead = peek_dead(&p.env).await;
    }
    let sent_expected = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Sent(_)))
        .count();
    p.smtp.wait_for_mails(sent_expected, WAIT).await;
    // Late extras (a second outcome, a stray mail) would come from a message
    // still queued or held: wait until none is.
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    let all = p.tap.all();
    let mails = p.smtp.mails();
    let dead = peek_dead(&p.env).await;
    let mut failures = Vec::new();
    for c in &cases {
        let outcomes = outcome_of(&all, &c.id);
        let its_mails: Vec<&CapturedMail> =
            mails.iter().filter(|m| mail_request(m) == c.id).collect();
        let letters: Vec<&(String, String, String)> = dead.iter().filter(|l| l.0 == c.id).collect();
        let verdict: Result<String, String> = match &c.expect {
            Expect::Sent(check) => match (outcomes.as_slice(), its_mails.as_slice(), letters.len())
            {
                ([o], [m], 0) if o["type"] == VERIFICATION_SENT => {
                    check(m, o).map(|()| "sent".to_owned())
                }
                _ => Err(format!(
                    "expected one sent outcome and one mail, got {outcomes:?}, {} mail(s), {} letter(s)",
                    its_mails.len(),
                    letters.len()
                )),
            },
            Expect::Failed(reason, field) => {
                match (outcomes.as_slice(), its_mails.len(), letters.len()) {
                    ([o], 0, 0)
                        if o["type"] == VERIFICATION_FAILED
                            && o["data"]["reason"] == *reason
                            && o["data"]["detail"]
                                .as_str()
                                .is_some_and(|d| d.starts_with(&format!("{field}:"))) =>
                    {
                        Ok(format!(
                            "failed/{reason}: {}",
                            o["data"]["detail"]
                                .as_str()
                                .unwrap_or_default()
                                .chars()
                                .take(80)
                                .collect::<String>()
                        ))
                    }
                    _ => Err(format!(
                        "expected failed/{reason} naming {field}, got {outcomes:?}, {} mail(s), {} letter(s)",
                        its_mails.len(),
                        letters.len()
                    )),
                }
            }
            Expect::Dead(reason, detail) => {
                match (outcomes.len(), its_mails.len(), letters.as_slice()) {
                    (0, 0, [l]) if l.1 == *reason && l.2.contains(detail) => Ok(format!(
                        "dead/{reason}: {}",
                        l.2.chars().take(80).collect::<String>()
                    )),
                    _ => Err(format!(
                        "expected one {reason} letter mentioning {detail:?}, got {outcomes:?}, {} mail(s), letters {letters:?}",
                        its_mails.len()
                    )),
                }
            }
        };
        match verdict {
            Ok(what) => println!("[hostile] {:<22} {what}", c.name),
            Err(why) => {
                println!("[hostile] {:<22} WRONG: {why}", c.name);
                failures.push(format!("{}: {why}", c.name));
            }
        }
    }
    let stray_mails: Vec<String> = mails
        .iter()
        .filter(|m| {
            !cases
                .iter()
                .any(|c| matches!(c.expect, Expect::Sent(_)) && mail_request(m) == c.id)
        })
        .map(|m| format!("{:?} to {:?}", m.message_id, m.to))
        .collect();
    let evil = mails
        .iter()
        .filter(|m| m.to.iter().any(|t| t.contains("evil")))
        .count();
    println!(
        "[hostile] {label}: cases={} sent={} failed={} dead={} mails={} stray_mails={} mails_to_evil={evil} total_s={:.1}",
        cases.len(),
        sent_expected,
        answered.len() - sent_expected,
        dead.len(),
        mails.len(),
        stray_mails.len(),
        started.elapsed().as_secs_f64()
    );
    let logs = tail(&p.worker.log(), 30);
    assert!(
        failures.is_empty(),
        "{} case(s) answered wrongly:\n{}\n{logs}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        stray_mails.is_empty() && evil == 0,
        "mails nobody should get: {stray_mails:?}"
    );
    assert_eq!(
        dead.len(),
        dead_expected,
        "only the expected dead letters: {dead:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_each_get_their_specific_answer_and_nothing_else() {
    run_cases("hostile", hostile_requests()).await;
}

/// PostgreSQL refuses NUL in text and jsonb (SQLSTATE 22021, 22P05). Were such
/// values to reach the claim, the worker would take the refusal for an outage
/// and hand the delivery back until the delivery limit; `shared::events`
/// refuses them up front (a NUL in `id`, a control character in `user_id`, a
/// NUL anywhere in `context`), which this test proves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_database_cannot_store_are_answered_not_retried_forever() {
    run_cases("unstorable", unstorable_requests()).await;
}

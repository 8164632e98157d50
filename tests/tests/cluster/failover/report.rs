//! The failover's report: every figure printed on a few lines (the run's
//! record, `--nocapture` shows it), and the problems the test fails on, each
//! with the figures that tell it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use verimail_shared::events::VERIFICATION_SENT;

use super::{Deployment, Fault, Rejoin, Watchers};
use crate::WAIT;
use crate::support::{connections_made, lock, longest_gap, longest_gap_in, longest_time_gap};

/// Everything the report reads, from every step of the test.
pub struct Run<'a> {
    pub d: &'a Deployment,
    pub w: &'a Watchers,
    pub fault: &'a Fault,
    pub requests: usize,
    pub rate: f64,
    pub up_secs: f64,
    /// The worker queue's leader before the load (the node killed).
    pub leader_before: u16,
    /// The leader the first `leader` call after the kill named.
    pub new_leader: Option<u16>,
    /// What each `leader` call after the kill answered, and when.
    pub leader_trace: &'a [String],
    pub drained: bool,
    pub drain_secs: f64,
    pub rejoin: &'a Rejoin,
    /// Messages in the dead-letter queue.
    pub dead: u32,
    /// Worker A's, worker B's and the gateway's logs.
    pub logs: &'a [String; 3],
}

/// Prints the figures; returns the problems, empty when nothing was lost or
/// doubled and the node rejoined.
pub fn report(run: &Run<'_>) -> Vec<String> {
    let Run {
        d,
        w,
        fault,
        requests,
        rate,
        up_secs,
        leader_before,
        new_leader,
        leader_trace,
        drained,
        drain_secs,
        rejoin,
        dead,
        logs,
    } = *run;
    let [log_a, log_b, log_gw] = logs;
    let Deployment {
        port_a,
        port_b,
        b_attempts,
        port_gw,
        ..
    } = *d;
    let Fault {
        t_load,
        t_kill,
        t_start,
        t_back,
        victim,
        outcomes_at_kill,
        ref kill_utc,
        kill_secs,
        kill_offset,
        restart_secs,
        back_offset,
        ref published,
        publish_secs,
        ..
    } = *fault;
    let Rejoin {
        ref status,
        running,
        ref worker_queue_line,
        victim_online,
    } = *rejoin;
    let s = lock(&w.seen);
    let c = lock(&w.clicks);
    let lost: Vec<&String> = published
        .confirmed
        .iter()
        .filter(|id| !s.outcomes.contains_key(*id))
        .collect();
    let outcome_diff_id = s.outcomes.values().filter(|ids| ids.len() > 1).count();
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for ty in s.outcome_type.values() {
        *by_type.entry(ty.as_str()).or_default() += 1;
    }
    let sent = by_type.get(VERIFICATION_SENT).copied().unwrap_or(0);
    let clicked: HashSet<&String> = c.answers.keys().collect();
    // A click answered 503 may still have committed (the answer's deadline
    // passed, not the transaction): its repeat then says `already_verified`.
    let good = |(code, status, retried): &&(u16, String, bool)| {
        *code == 200 && (status == "verified" || (*retried && status == "already_verified"))
    };
    let click_ok = c.answers.values().flatten().filter(good).count();
    let click_other: Vec<&(u16, String, bool)> =
        c.answers.values().flatten().filter(|a| !good(a)).collect();
    let verified_for_clicks = clicked
        .iter()
        .filter(|id| s.verified.get(**id).is_some_and(|v| !v.is_empty()))
        .count();
    let verified_diff_id = s.verified.values().filter(|ids| ids.len() > 1).count();
    let (gap, gap_at) = longest_gap(&s.outcome_arrivals, t_kill);
    // Around the kill (until the restart began) and around the rejoin
    // (the restart and five seconds after it).
    let (gap_kill, _) = longest_gap_in(
        &s.outcome_arrivals,
        t_kill,
        Some((t_kill - Duration::from_secs(1), t_start)),
    );
    let (gap_rejoin, _) = longest_gap_in(
        &s.outcome_arrivals,
        t_kill,
        Some((t_start, t_back + Duration::from_secs(5))),
    );
    let since_load = |t: Option<Instant>| t.map_or(-1.0, |t| (t - t_load).as_secs_f64());
    let last_outcome = since_load(s.outcome_arrivals.iter().max().copied());
    let last_verified = since_load(s.last_verified_at);
    let last_click = since_load(c.last_at);
    let gap_worker = longest_time_gap(s.outcome_times.clone());
    let both = format!("{log_a}\n{log_b}");
    let count = |text: &str| both.lines().filter(|l| l.contains(text)).count();

    println!("== cluster failover figures ({})", d.env.namespace);
    println!(
        "cluster up: {up_secs:.1} s; worker A on {port_a}, worker B on {port_b} (after {b_attempts} start(s)), gateway on {port_gw:?}; worker queue leader {leader_before}"
    );
    println!(
        "load: {requests} requests offered at {rate}/s over {publish_secs:.1} s; killed {victim} at +{kill_offset:.1} s ({kill_utc}) in {kill_secs:.1} s \
         ({outcomes_at_kill} outcomes by then); new leader {new_leader:?}, `leader` answers after the kill: {}; \
         `start` took {restart_secs:.1} s, node back at +{back_offset:.1} s; last outcome at +{last_outcome:.1} s, \
         last click at +{last_click:.1} s, last verified event at +{last_verified:.1} s; drained at +{drain_secs:.1} s",
        leader_trace.join(" ")
    );
    println!(
        "requests: {} confirmed, {} unconfirmed, {} publish retries, slowest confirm {:.1} s",
        published.confirmed.len(),
        published.unconfirmed.len(),
        published.retries,
        published.slowest.as_secs_f64()
    );
    println!(
        "outcomes: {} distinct request ids ({by_type:?}); duplicates: {} same event id, {} different id; lost: {}",
        s.outcomes.len(),
        s.outcome_same_id,
        outcome_diff_id,
        lost.len()
    );
    println!(
        "mails: {} captured, {} distinct Message-IDs, {} duplicate, {} unusable",
        d.smtp.count(),
        c.message_ids.len(),
        c.duplicate_mails,
        c.unusable
    );
    println!(
        "clicks: {} requests clicked, {click_ok} answered 200 verified, {} other answers, {} errors, {} repeated after a 503",
        clicked.len(),
        click_other.len(),
        c.errors,
        c.retried_503
    );
    println!(
        "verified events: {} request ids, {verified_for_clicks} of the clicked; duplicates: {} same event id, {verified_diff_id} different id",
        s.verified.len(),
        s.verified_same_id
    );
    println!(
        "seconds without progress: {:.2} s at the tap (gap began {gap_at:+.1} s from the kill; \
         longest from the kill to the restart {:.2} s, during the restart and 5 s after {:.2} s), {:.2} s by the outcomes' own time",
        gap.as_secs_f64(),
        gap_kill.as_secs_f64(),
        gap_rejoin.as_secs_f64(),
        gap_worker.as_secs_f64()
    );
    println!(
        "reconnections: worker A {}, worker B {}, gateway {}; tap reconnections {} (redeliveries to the tap {}); dead letters {dead}",
        connections_made(log_a).saturating_sub(1),
        connections_made(log_b).saturating_sub(1),
        connections_made(log_gw).saturating_sub(1),
        w.tap_reconnects.load(Ordering::Relaxed),
        s.tap_redeliveries
    );
    println!(
        "workers: {} deliveries found the request in hand elsewhere (sent to the 5 s retry queue), {} duplicates of finished requests, \
         {} stored outcomes re-published, {} publish failures retried",
        count("request in hand elsewhere"),
        count("duplicate of a finished request"),
        count("re-publishing the stored outcome"),
        count("publish failed; retrying")
    );
    println!(
        "after the restart: {running}/3 nodes running; {} online members: {}",
        d.topology.worker_queue(),
        worker_queue_line.split('\t').nth(2).unwrap_or("?")
    );

    let mut problems = Vec::new();
    if !drained {
        problems.push(format!("the pipeline stopped making progress for {WAIT:?}"));
    }
    if !published.unconfirmed.is_empty() {
        problems.push(format!(
            "{} publishes never confirmed",
            published.unconfirmed.len()
        ));
    }
    if !lost.is_empty() {
        problems.push(format!(
            "{} requests without an outcome, e.g. {:?}",
            lost.len(),
            lost.first()
        ));
    }
    if outcome_diff_id > 0 {
        problems.push(format!(
            "{outcome_diff_id} requests with two different outcome events"
        ));
    }
    if sent != published.confirmed.len() {
        problems.push(format!(
            "{sent} sent of {} (one user per request: all should be sent)",
            published.confirmed.len()
        ));
    }
    if c.duplicate_mails > 0 || c.message_ids.len() != sent {
        problems.push(format!(
            "{} mails for {sent} sent outcomes ({} duplicates)",
            c.message_ids.len(),
            c.duplicate_mails
        ));
    }
    if clicked.len() != sent || click_ok != sent {
        problems.push(format!(
            "{} clicked, {click_ok} verified answers for {sent} mails; others: {:?}",
            clicked.len(),
            click_other.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if verified_for_clicks != clicked.len() || verified_diff_id > 0 {
        problems.push(format!(
            "{verified_for_clicks} of {} clicks have a verified event; {verified_diff_id} with two different ids",
            clicked.len()
        ));
    }
    if dead != 0 {
        problems.push(format!("{dead} dead letters"));
    }
    if running != 3 || !victim_online {
        problems.push(format!(
            "the node did not rejoin: {status}\n{worker_queue_line}"
        ));
    }
    problems
}

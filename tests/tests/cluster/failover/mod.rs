//! The node-loss test: the whole pipeline on the cluster, the node leading
//! `{ns}.worker` killed a third of the way into the load and started again ten
//! seconds later, then every request, mail, click and verified event counted.
//!
//! The test reads as its steps: bring the cluster up, deploy, watch, load and
//! lose the leader, drain, settle, check the node rejoined, count the dead
//! letters, report (`report`), stop. What a step hands the next is a struct
//! of its own: `Deployment` and `Watchers` (`setup`), `Fault` and `Rejoin`
//! (here).

mod report;
mod setup;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::task::JoinHandle;
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, tail};
use verimail_tests::settle::{LIST_QUEUES, settled_by};

use crate::support::{Published, cluster, env_or, leader, lock, publish_paced};
use crate::{CLUSTER, WAIT};
use report::{Run, report};
use setup::{Deployment, Watchers, bring_up_the_cluster, deploy, watch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_worker_queues_leader_node_under_load_loses_and_doubles_nothing()
-> anyhow::Result<()> {
    let _only_one = CLUSTER.lock().await;
    let requests: usize = env_or("CLUSTER_TEST_REQUESTS", 5000);
    let rate: f64 = env_or("CLUSTER_TEST_RATE", 100.0);
    let (urls, up_secs) = bring_up_the_cluster().await?;
    let d = deploy(&urls).await?;
    let (leader_name, leader_before) = leader(&d.topology.worker_queue()).await?;
    let w = watch(&urls, &d).await?;
    let (fault, leader_poll) =
        load_and_lose_the_leader(&d, &w, requests, rate, leader_name, leader_before).await?;
    let drained = drain(&d, &w, &fault.published).await;
    let drain_secs = fault.t_load.elapsed().as_secs_f64();
    let (new_leader, leader_trace) = leader_poll.await?;
    let w = settle_and_stop_watching(&d, w).await?;
    let rejoin = rejoined(&d, &fault).await?;
    let dead = dead_letters(&d, &w).await;

    // The figures, read before the services stop (their logs with them).
    let logs = [d.worker_a.log(), d.worker_b.log(), d.gateway.log()];
    let mut problems = report(&Run {
        d: &d,
        w: &w,
        fault: &fault,
        requests,
        rate,
        up_secs,
        leader_before,
        new_leader,
        leader_trace: &leader_trace,
        drained,
        drain_secs,
        rejoin: &rejoin,
        dead,
        logs: &logs,
    });

    problems.extend(stop_services(d.worker_a, d.worker_b, d.gateway).await);
    clean_up(&w, &d.env).await;

    if !problems.is_empty() {
        let [log_a, log_b, log_gw] = &logs;
        bail!(
            "{}\n--- worker A (tail) ---\n{}\n--- worker B (tail) ---\n{}\n--- gateway (tail) ---\n{}",
            problems.join("\n"),
            tail(log_a, 30),
            tail(log_b, 30),
            tail(log_gw, 30)
        );
    }
    Ok(())
}

/// The load, the kill and the restart: what was published and when each
/// thing happened.
struct Fault {
    /// When the load began.
    t_load: Instant,
    /// When the kill began.
    t_kill: Instant,
    /// When the killed node's start began.
    t_start: Instant,
    /// When the killed node's start returned.
    t_back: Instant,
    /// The killed node's name and AMQP port.
    victim_name: String,
    victim: u16,
    /// Outcomes the tap had seen when the kill began.
    outcomes_at_kill: usize,
    /// Wall-clock time of the kill, to find it in the services' logs.
    kill_utc: String,
    kill_secs: f64,
    kill_offset: f64,
    restart_secs: f64,
    back_offset: f64,
    published: Published,
    publish_secs: f64,
}

/// The new leader asked on the side after the kill, and what each `leader`
/// call answered.
type LeaderPoll = JoinHandle<(Option<u16>, Vec<String>)>;

/// Whether the killed node came back as a member of the worker queue.
struct Rejoin {
    /// `rabbitmq-cluster.sh status`.
    status: String,
    /// Nodes `status` says run.
    running: usize,
    /// The worker queue's line of `list_queues name members online`.
    worker_queue_line: String,
    victim_online: bool,
}

/// Load: `requests` at `rate`/s; the leader's node dies a third of the way
/// in and comes back ten seconds later, while the load goes on. Returns once
/// every request was published, with the new leader still being asked.
async fn load_and_lose_the_leader(
    d: &Deployment,
    w: &Watchers,
    requests: usize,
    rate: f64,
    leader_name: String,
    leader_before: u16,
) -> anyhow::Result<(Fault, LeaderPoll)> {
    let load_secs = requests as f64 / rate;
    let t_load = Instant::now();
    let publishing = tokio::spawn(publish_paced(
        w.publisher.clone(),
        d.topology.clone(),
        requests,
        rate,
    ));
    tokio::time::sleep(Duration::from_secs_f64(load_secs / 3.0)).await;
    // The leader named just before the load: asking again now would take a
    // rabbitmqctl run, which under this load can last tens of seconds.
    let (victim_name, victim) = (leader_name, leader_before);
    let outcomes_at_kill = lock(&w.seen).outcome_arrivals.len();
    let t_kill = Instant::now();
    // Wall-clock time of the kill, to find it in the services' logs.
    let kill_utc = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    cluster(&["kill", &victim.to_string()]).await?;
    let kill_secs = t_kill.elapsed().as_secs_f64();
    let kill_offset = (t_kill - t_load).as_secs_f64();
    // The new leader, as the first `leader` call after the kill names it.
    // Who leads now, asked on the side: each `leader` call is a rabbitmqctl
    // run, which right after a node loss on this machine can take tens of
    // seconds; the trace says what each call answered, and when (seconds
    // after the kill).
    let worker_queue = d.topology.worker_queue();
    let leader_poll = tokio::spawn(async move {
        let mut new_leader = None;
        let mut trace = Vec::new();
        let deadline = Instant::now() + WAIT;
        while new_leader.is_none() && Instant::now() < deadline {
            let answer = leader(&worker_queue).await;
            let at = t_kill.elapsed().as_secs_f64();
            match answer {
                Ok((_, p)) if p != victim => {
                    new_leader = Some(p);
                    trace.push(format!("{at:.1}s:{p}"));
                }
                Ok((_, p)) => trace.push(format!("{at:.1}s:{p}")),
                Err(e) => trace.push(format!(
                    "{at:.1}s:{}",
                    e.to_string().lines().last().unwrap_or_default()
                )),
            }
            if new_leader.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        (new_leader, trace)
    });
    tokio::time::sleep_until((t_kill + Duration::from_secs(10)).into()).await;
    let t_start = Instant::now();
    cluster(&["start", &victim.to_string()]).await?;
    let restart_secs = t_start.elapsed().as_secs_f64();
    let t_back = Instant::now();
    let back_offset = (Instant::now() - t_load).as_secs_f64();

    let published = publishing.await?;
    let publish_secs = published.took.as_secs_f64();
    let fault = Fault {
        t_load,
        t_kill,
        t_start,
        t_back,
        victim_name,
        victim,
        outcomes_at_kill,
        kill_utc,
        kill_secs,
        kill_offset,
        restart_secs,
        back_offset,
        published,
        publish_secs,
    };
    Ok((fault, leader_poll))
}

/// Drain: an outcome for every request, every mail clicked, a verified event
/// for every click; gives up only when nothing moved for WAIT. Whether it
/// drained.
async fn drain(d: &Deployment, w: &Watchers, published: &Published) -> bool {
    let mut last_progress = Instant::now();
    let mut last_state = (0, 0, 0);
    loop {
        let (outcomes, verified_clicks) = {
            let s = lock(&w.seen);
            let c = lock(&w.clicks);
            (
                published
                    .confirmed
                    .iter()
                    .filter(|id| s.outcomes.contains_key(*id))
                    .count(),
                c.answers
                    .keys()
                    .filter(|id| s.verified.contains_key(*id))
                    .count(),
            )
        };
        let (mails_seen, finished, clicked) = {
            let c = lock(&w.clicks);
            (c.mails, c.finished + c.unusable as usize, c.answers.len())
        };
        let done = outcomes == published.confirmed.len()
            && mails_seen >= d.smtp.count()
            && w.pending_clicks.load(Ordering::SeqCst) == 0
            && finished >= mails_seen
            && verified_clicks >= clicked;
        if done {
            break true;
        }
        let state = (outcomes, finished, verified_clicks);
        if state != last_state {
            last_state = state;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > WAIT {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Late duplicates (a re-sent copy after a reconnect) would come from a
/// message still queued or held, or an outbox row not yet relayed: waits
/// until the cluster holds none, as a running node reports it; then stops
/// the clicker and the tap.
async fn settle_and_stop_watching(d: &Deployment, mut w: Watchers) -> anyhow::Result<Watchers> {
    let tap_name = w.tap_queue.to_string();
    ensure!(
        settled_by(&d.env, &tap_name, WAIT, || async {
            for node in ["1", "2", "3"] {
                let mut args = vec!["ctl", node];
                args.extend_from_slice(LIST_QUEUES);
                if let Ok(listing) = cluster(&args).await {
                    return Some(listing);
                }
            }
            None
        })
        .await,
        "the cluster's queues and the outbox did not settle"
    );
    w.stop.cancel();
    let _ = (&mut w.clicker).await;
    let _ = (&mut w.tap).await;
    Ok(w)
}

/// The node rejoined: `status` says all three run, and the killed node is an
/// online member of the worker queue.
async fn rejoined(d: &Deployment, fault: &Fault) -> anyhow::Result<Rejoin> {
    let status = cluster(&["status"]).await?;
    let running = status
        .lines()
        .filter(|l| l.starts_with("vmc") && l.ends_with(" running"))
        .count();
    let members = cluster(&[
        "ctl",
        &fault.victim.to_string(),
        "-q",
        "list_queues",
        "--no-table-headers",
        "name",
        "members",
        "online",
    ])
    .await
    .unwrap_or_default();
    let worker_queue_line = members
        .lines()
        .find(|l| l.starts_with(&format!("{}\t", d.topology.worker_queue())))
        .unwrap_or_default()
        .to_owned();
    let victim_online = worker_queue_line
        .split('\t')
        .nth(2)
        .is_some_and(|online| online.contains(&fault.victim_name));
    Ok(Rejoin {
        status,
        running,
        worker_queue_line,
        victim_online,
    })
}

/// Dead letters: nothing should have gone there (`u32::MAX` when the queue
/// cannot be read).
async fn dead_letters(d: &Deployment, w: &Watchers) -> u32 {
    async {
        let ch = w.tap_bus.channel().await?;
        let q = ch
            .queue_declare(
                d.topology.dead_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok(q.message_count())
    }
    .await
    .unwrap_or(u32::MAX)
}

/// Services stop cleanly after a failover too: a problem for each that does
/// not exit 0 on SIGTERM.
async fn stop_services(worker_a: Proc, worker_b: Proc, gateway: Proc) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, p) in [
        ("worker A", worker_a),
        ("worker B", worker_b),
        ("gateway", gateway),
    ] {
        let log = p.log();
        let code = p.stop(Duration::from_secs(30)).await;
        if code != Some(0) {
            problems.push(format!(
                "{name} exited {code:?} on SIGTERM; log tail:\n{}",
                tail(&log, 20)
            ));
        }
    }
    problems
}

/// Deletes the tap's queue, closes the buses and drops the database.
async fn clean_up(w: &Watchers, env: &TestEnv) {
    if let Ok(ch) = w.tap_bus.channel().await {
        let _ = ch
            .queue_delete(w.tap_queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    w.bus_stop.cancel();
    w.tap_bus.close().await;
    w.pub_bus.close().await;
    env.cleanup().await;
}

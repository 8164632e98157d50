//! `verimail-bench report`: the final table from the results file, with ratios
//! and the targets.

use anyhow::Result;

use crate::results::*;
use crate::system::*;

pub(crate) fn report(out: &Results) -> Result<()> {
    let r = out.load()?;
    let num = |k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok());
    let fmt_num = |v: Option<f64>, unit: &str| match v {
        Some(v) if v >= 100.0 => format!("{} {unit}", thousands(v)),
        Some(v) => format!("{v:.1} {unit}"),
        None => "—".into(),
    };
    let status = |ok: Option<bool>| match ok {
        Some(true) => "MET",
        Some(false) => "NOT MET",
        None => "not measured",
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut rows: Vec<[String; 3]> = Vec::new();
    let mut row = |figure: &str, value: String, target: &str, st: &str| {
        let t = if target.is_empty() {
            String::new()
        } else {
            format!("{target} → {st}")
        };
        rows.push([figure.to_owned(), value, t]);
    };

    let ceiling = num("ceiling_mps");
    let w1 = num("worker_1_mps");
    let ref_w = num("ref_worker_mps");
    let get = |k: &str| r.get(k).map_or("?", String::as_str);
    row(
        &format!(
            "broker-only ceiling (N={}, prefetch {}, confirms)",
            get("ceiling_n"),
            get("ceiling_prefetch")
        ),
        fmt_num(ceiling, "msg/s"),
        "",
        "",
    );
    for p in [1, 2, 4] {
        let k = format!("worker_{p}");
        if let Some(v) = num(&format!("{k}_mps")) {
            let target = if p == 1 { "≥ 6,500 mails/s" } else { "" };
            row(
                &format!(
                    "verimail worker, {p} process{} (N={}, WORKER_CONCURRENCY {})",
                    if p == 1 { "" } else { "es" },
                    get(&format!("{k}_n")),
                    get(&format!("{k}_concurrency"))
                ),
                format!(
                    "{} (steady {})",
                    fmt_num(Some(v), "mails/s"),
                    fmt_num(num(&format!("{k}_steady_mps")), "/s")
                ),
                target,
                status((p == 1).then_some(v >= 6500.0)),
            );
        }
    }
    if let Some(v) = num("worker_default_1_mps") {
        row(
            &format!(
                "verimail worker, 1 process, former default WORKER_CONCURRENCY {} (N={})",
                get("worker_default_1_concurrency"),
                get("worker_default_1_n")
            ),
            format!(
                "{} (steady {})",
                fmt_num(Some(v), "mails/s"),
                fmt_num(num("worker_default_1_steady_mps"), "/s")
            ),
            "",
            "",
        );
    }
    if let Some(v) = num("worker_chunking_1_mps") {
        let ceiling_share = ceiling.map_or(String::new(), |c| {
            format!(", {:.0} % of the ceiling", v / c * 100.0)
        });
        row(
            &format!(
                "verimail worker, 1 process, into a sink offering CHUNKING (one BDAT round trip per mail; N={})",
                get("worker_chunking_1_n")
            ),
            format!(
                "{} (steady {}{ceiling_share}); CPU per mail {} / {} ms",
                fmt_num(Some(v), "mails/s"),
                fmt_num(num("worker_chunking_1_steady_mps"), "/s"),
                get("worker_chunking_1_cpu_ms_per_mail"),
                get("worker_chunking_1_pg_cpu_ms_per_mail")
            ),
            "",
            "",
        );
    }
    if w1.is_none() {
        row(
            "verimail worker, 1 process",
            "—".into(),
            "≥ 6,500 mails/s",
            status(None),
        );
    }
    row(
        &format!(
            "reference worker (N={})",
            r.get("ref_worker_n").map_or("?", String::as_str)
        ),
        fmt_num(ref_w, "mails/s"),
        "",
        "",
    );
    row(
        "ratio worker / reference worker",
        ratio(w1, ref_w).map_or("—".into(), |x| format!("{x:.1}×")),
        "",
        "",
    );
    let of_ceiling = ratio(w1, ceiling);
    row(
        "ratio worker / broker ceiling",
        of_ceiling.map_or("—".into(), |x| format!("{:.0} %", x * 100.0)),
        "≥ 35 %",
        status(of_ceiling.map(|x| x >= 0.35)),
    );
    for rate in [200, 500, 1000] {
        let p50 = num(&format!("latency_{rate}_p50_ms"));
        let p99 = num(&format!("latency_{rate}_p99_ms"));
        if p50.is_none() && rate != 1000 {
            continue;
        }
        let (target, st) = if rate == 1000 {
            ("p99 ≤ 50 ms", status(p99.map(|p| p <= 50.0)))
        } else {
            ("", "")
        };
        row(
            &format!("latency publish→sent_at @ {rate}/s, p50 / p99"),
            match (p50, p99) {
                (Some(a), Some(b)) => format!(
                    "{a:.1} / {b:.1} ms ({} of {} sent)",
                    r.get(&format!("latency_{rate}_sent"))
                        .map_or("?", String::as_str),
                    r.get(&format!("latency_{rate}_published"))
                        .map_or("?", String::as_str)
                ),
                _ => "—".into(),
            },
            target,
            st,
        );
    }
    let worker_hwm = [
        "worker_1_hwm_kib",
        "worker_2_hwm_kib",
        "worker_4_hwm_kib",
        "worker_default_1_hwm_kib",
        "latency_worker_hwm_kib",
    ]
    .iter()
    .filter_map(|k| num(k))
    .fold(None, |acc: Option<f64>, v| {
        Some(acc.map_or(v, |a| a.max(v)))
    });
    row(
        "worker RSS, 1 process: VmRSS at end / peak VmHWM (max over all runs)",
        match (num("worker_1_rss_kib"), worker_hwm) {
            (Some(a), Some(b)) => format!("{:.1} / {:.1} MiB", a / 1024.0, b / 1024.0),
            _ => "—".into(),
        },
        "≤ 100 MB",
        status(worker_hwm.map(|h| h / 1024.0 <= 100.0)),
    );
    let w_cpu = num("worker_1_cpu_ms_per_mail");
    let pg_cpu = num("worker_1_pg_cpu_ms_per_mail");
    let ms = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
    row(
        "CPU per mail, 1 worker: the worker / PostgreSQL (this database's backends; + background) / RabbitMQ (whole broker)",
        format!(
            "{} / {} (+ {}) / {} ms",
            ms(w_cpu),
            ms(pg_cpu),
            ms(num("worker_1_pg_bg_cpu_ms_per_mail")),
            ms(num("worker_1_broker_cpu_ms_per_mail"))
        ),
        "worker ≤ 0.07, PostgreSQL ≤ 0.04 ms",
        status(w_cpu.zip(pg_cpu).map(|(w, p)| w <= 0.07 && p <= 0.04)),
    );
    row(
        "CPU of the process itself: ceiling consumer ms per message / gateway ms per request",
        format!(
            "{} / {} ms",
            r.get("ceiling_consumer_cpu_ms_per_msg")
                .map_or("—", String::as_str),
            r.get("gateway_cpu_ms_per_req").map_or("—", String::as_str)
        ),
        "",
        "",
    );
    let g = num("gateway_rps");
    let g99 = num("gateway_p99_ms");
    row(
        "verimail gateway confirms/s (wrk -t2 -c32 -d10s)",
        format!(
            "{} ({} confirmed, {} already_verified, {} other)",
            fmt_num(g, "req/s"),
            r.get("gateway_ok").map_or("?", String::as_str),
            r.get("gateway_already").map_or("?", String::as_str),
            r.get("gateway_other").map_or("?", String::as_str)
        ),
        "≥ 8,000/s",
        status(g.map(|v| v >= 8000.0)),
    );
    row(
        "gateway latency p50 / p99",
        match (num("gateway_p50_ms"), g99) {
            (Some(a), Some(b)) => format!("{a:.2} / {b:.2} ms"),
            _ => "—".into(),
        },
        "p99 ≤ 20 ms",
        status(g99.map(|v| v <= 20.0)),
    );
    let g_hwm = num("gateway_hwm_kib");
    row(
        "gateway RSS after load / peak VmHWM",
        match (num("gateway_rss_kib"), g_hwm) {
            (Some(a), Some(b)) => format!("{:.1} / {:.1} MiB", a / 1024.0, b / 1024.0),
            _ => "—".into(),
        },
        "≤ 60 MB",
        status(g_hwm.map(|h| h / 1024.0 <= 60.0)),
    );
    let c = num("codes_rps");
    let c99 = num("codes_p99_ms");
    row(
        "verimail gateway code checks/s, right codes (wrk -t2 -c32 -d10s)",
        format!(
            "{} ({} verified, {} already_verified, {} other), p99 {}",
            fmt_num(c, "req/s"),
            r.get("codes_ok").map_or("?", String::as_str),
            r.get("codes_already").map_or("?", String::as_str),
            r.get("codes_other").map_or("?", String::as_str),
            c99.map_or("—".into(), |v| format!("{v:.2} ms"))
        ),
        "≥ 5,000/s, p99 ≤ 20 ms",
        status(c.zip(c99).map(|(v, p)| v >= 5000.0 && p <= 20.0)),
    );
    let rc = num("ref_confirm_rps");
    row(
        "reference confirm, gunicorn -w 2 (same wrk)",
        format!(
            "{}, p50 / p99 {} / {} ms",
            fmt_num(rc, "req/s"),
            r.get("ref_confirm_p50_ms").map_or("?", String::as_str),
            r.get("ref_confirm_p99_ms").map_or("?", String::as_str)
        ),
        "",
        "",
    );
    row(
        "ratio gateway / reference confirm",
        ratio(g, rc).map_or("—".into(), |x| format!("{x:.1}×")),
        "",
        "",
    );
    row(
        "RSS: reference worker (ru_maxrss) / gunicorn master + 2 workers",
        format!(
            "{} / {}",
            num("ref_worker_rss_kib").map_or("—".into(), |v| mib(v as u64)),
            num("ref_confirm_rss_kib").map_or("—".into(), |v| mib(v as u64))
        ),
        "",
        "",
    );

    let w0 = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
    let w1c = rows.iter().map(|r| r[1].chars().count()).max().unwrap_or(0);
    println!();
    println!("== verimail bench: final table");
    for k in ["date", "host", "cpu", "nproc", "load_before", "load_after"] {
        if let Some(v) = r.get(k) {
            println!("   {k}: {v}");
        }
    }
    println!();
    for [a, b, c] in &rows {
        println!(
            "  {a}{}  {b}{}  {c}",
            " ".repeat(w0 - a.chars().count()),
            " ".repeat(w1c - b.chars().count())
        );
    }
    Ok(())
}

/// 12345.6 → "12,346".
pub(crate) fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut outs = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            outs.push(',');
        }
        outs.push(c);
    }
    outs
}

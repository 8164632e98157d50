//! One mail's three parts rendered: the built-ins as plain templates (what the
//! worker does) against the same templates through minijinja, in one run.
//!
//! `cargo bench -p verimail-worker --bench render` (a plain binary: no harness,
//! no criterion). Each case warms up, then runs timed batches for about half a
//! second and reports the best batch's mean, the least disturbed by other
//! processes.

use std::hint::black_box;
use std::time::Duration;

use time::OffsetDateTime;
use verimail_shared::events::Purpose;
use verimail_worker::mail::{MailContext, Templates};

#[path = "../../shared/benches/support/timing.rs"]
mod timing;

const BATCH: u32 = 200;

fn bench(name: &str, op: impl FnMut()) -> f64 {
    let best = timing::best_mean_ns(BATCH, op);
    println!("{name:<40} {best:>9.0} ns/mail");
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let templates = Templates::load(None)?;
    for (locale, name, link, code) in [
        (
            "en",
            Some("Alice"),
            Some("https://verify.example.com/confirm/v1.eyJ1IjoiNDIifQ.sig"),
            None,
        ),
        (
            "en",
            None,
            Some("https://verify.example.com/confirm/v1.eyJ1IjoiNDIifQ.sig"),
            Some("042917"),
        ),
        (
            "zh-CN",
            Some("小明"),
            Some("https://verify.example.com/confirm/v1.eyJ1IjoiNDIifQ.sig"),
            None,
        ),
    ] {
        let ctx = MailContext {
            name,
            email: "alice@example.com",
            link,
            code,
            purpose: Purpose::VerifyEmail,
            expires_at: OffsetDateTime::from_unix_timestamp(1_800_000_000)?,
            ttl: Duration::from_secs(3600),
        };
        let label = format!(
            "{locale}, link{}",
            if code.is_some() { " + code" } else { "" }
        );
        let plain = bench(&format!("plain     {label}"), || {
            black_box(
                templates
                    .render(Some(black_box(locale)), black_box(&ctx))
                    .ok(),
            );
        });
        let jinja = bench(&format!("minijinja {label}"), || {
            black_box(
                templates
                    .render_with_minijinja(black_box(locale), black_box(&ctx))
                    .ok(),
            );
        });
        println!("{:<40} {:>9.1}x", "  minijinja / plain", jinja / plain);
    }
    Ok(())
}

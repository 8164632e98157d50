//! A user clicking every mailed link while things break: each click retried
//! while the gateway answers 503 or not at all, every other answer recorded.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use verimail_tests::http;
use verimail_tests::smtp::{SmtpServer, mail_request};

/// What clicking every link did.
#[derive(Debug, Default, Clone)]
pub struct Clicks {
    /// Links confirmed (200 verified or already_verified), by request id.
    pub confirmed: HashSet<String>,
    /// Attempts answered 503 (database unavailable): retried.
    pub unavailable: usize,
    /// Attempts that failed at the socket (gateway not answering): retried.
    pub socket_errors: usize,
    /// Any other answer: never expected.
    pub unexpected: Vec<String>,
}

/// Clicks every link the SMTP server receives until `want` distinct requests
/// are confirmed or `deadline`; each click is retried while it answers 503 or
/// the socket fails.
pub async fn click_all(smtp: &SmtpServer, want: usize, deadline: Instant) -> Clicks {
    let mut clicks = Clicks::default();
    let mut next = 0;
    while clicks.confirmed.len() < want && Instant::now() < deadline {
        let mails = smtp.mails();
        if mails.len() <= next {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for mail in &mails[next..] {
            let request = mail_request(mail);
            if clicks.confirmed.contains(&request) {
                continue;
            }
            let Some(link) = mail.link.clone() else {
                clicks
                    .unexpected
                    .push(format!("{request}: no link in the mail"));
                continue;
            };
            loop {
                match http::post(&link, &[("Accept", "application/json")]).await {
                    Ok((200, _, body)) if body.contains("verified") => {
                        clicks.confirmed.insert(request.clone());
                        break;
                    }
                    Ok((503, _, _)) => clicks.unavailable += 1,
                    Ok((code, _, body)) => {
                        clicks.unexpected.push(format!("{request}: {code} {body}"));
                        break;
                    }
                    Err(_) => clicks.socket_errors += 1,
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        next = mails.len();
    }
    clicks
}

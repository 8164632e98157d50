//! `verimail outbox`: the mail of a request (or the latest) in a `file://`
//! outbox, read back as the worker writes it.

use std::time::Duration;

use serde_json::Value;

use crate::common::namespace;
use crate::support::{command, run, stderr, stdout};

/// A mail as the worker writes it: a base64 text part and a quoted-printable
/// HTML part whose link is cut by soft line breaks.
fn eml(to: &str, link: &str) -> String {
    use std::fmt::Write as _;
    let text = format!(
        "Please confirm your address:\r\n\r\n{link}\r\n\r\nSee https://example.com/help\r\n"
    );
    let b64 = base64_lines(text.as_bytes());
    let html = format!("<p><a href=3D\"{link}\">Confirm</a></p>");
    let mut qp = String::new();
    for (i, c) in html.chars().enumerate() {
        if i > 0 && i % 60 == 0 {
            qp.push_str("=\r\n");
        }
        let _ = write!(qp, "{c}");
    }
    format!(
        "From: verimail <no-reply@localhost>\r\nTo: \"Ada\" <{to}>\r\nSubject: Confirm your email address\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n\
         --b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n\
         --b1--\r\n"
    )
}

fn base64_lines(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
        if out.len() % 78 == 76 {
            out.push_str("\r\n");
        }
    }
    out
}

#[tokio::test]
async fn outbox_prints_the_mail_of_a_request_or_the_latest_and_exit_1_without_one() {
    let ns = namespace();
    let dir = std::env::temp_dir().join(format!("verimail-cli-outbox-{ns}"));
    std::fs::create_dir_all(&dir).expect("an outbox");
    let mail_url = format!("file://{}", dir.display());
    let env = [("MAIL_URL", mail_url.as_str())];
    let link = "http://127.0.0.1:8080/confirm/v1.KxYKljBC.AJb6vbANAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.cxf1GJe0FyriWp9N7zb1Bp2jufi2UsEzbSER3H6-Nus";

    let out = run(&ns, &env, &["outbox"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an empty outbox has no latest mail"
    );

    std::fs::write(dir.join("req-1.eml"), eml("ada@example.com", link)).expect("write");
    // Written later, so the latest; its id has a `/`, encoded in the file name.
    std::thread::sleep(Duration::from_millis(20));
    let other = link.replace("v1.", "v1.other");
    std::fs::write(dir.join("signup%2F2.eml"), eml("bob@example.com", &other)).expect("write");

    let out = run(&ns, &env, &["outbox", "req-1"]).await;
    assert_eq!(out.status.code(), Some(0));
    let mail: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(mail["request_id"], "req-1");
    assert_eq!(mail["to"], "ada@example.com");
    assert_eq!(mail["subject"], "Confirm your email address");
    assert_eq!(mail["link"], link, "decoded from the base64 part");
    assert_eq!(mail["code"], Value::Null);
    assert_eq!(mail["file"], dir.join("req-1.eml").display().to_string());

    let out = run(&ns, &env, &["outbox"]).await;
    assert_eq!(out.status.code(), Some(0));
    let latest: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(latest["request_id"], "signup/2");
    assert_eq!(latest["link"], other.as_str());
    let out = run(&ns, &env, &["outbox", "signup/2"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // --wait: the mail written while the command waits for it.
    let waiting = command(&ns, &env, &["outbox", "late-1", "--wait", "20"]).output();
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(dir.join("late-1.eml"), eml("ada@example.com", link)).expect("write");
    };
    let (out, ()) = tokio::join!(waiting, writer);
    let out = out.expect("the binary runs");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"request_id\":\"late-1\""));

    let out = run(&ns, &env, &["outbox", "no-such-request"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-request"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    std::fs::remove_dir_all(&dir).expect("clean up");
}

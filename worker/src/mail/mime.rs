//! The body of a `multipart/alternative` message written straight into the
//! message buffer: each part's transfer encoding chosen as lettre chooses it
//! (7bit for short ASCII lines, else quoted-printable or base64, whichever is
//! shorter), line ends made CRLF in the same pass.
//!
//! Why by hand: lettre's builder copied each part into its own body, encoded
//! it into a second buffer and formatted the whole message into a third; that
//! was the largest share of the worker's instructions per mail.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Longest encoded line (RFC 2045, 6.7 and 6.8), without its CRLF.
const LINE: usize = 76;

/// How a part is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TransferEncoding {
    SevenBit,
    QuotedPrintable,
    Base64,
}

impl TransferEncoding {
    /// The encoding for `body`. 7bit is only chosen when the body cannot
    /// contain the boundary's `=_` (quoted-printable and base64 never do), so
    /// no body can end the part early.
    pub(super) fn choose(body: &str) -> Self {
        let bytes = body.as_bytes();
        if body.is_ascii() && !long_line(bytes) && !body.contains("=_") {
            return Self::SevenBit;
        }
        // Counted into a byte per 255 input bytes, branch-free, so the
        // compiler counts sixteen bytes at a time.
        let escaped: usize = bytes
            .chunks(255)
            .map(|chunk| {
                usize::from(chunk.iter().fold(0u8, |n, &b| {
                    n + u8::from((b.wrapping_sub(b' ') > b'~' - b' ') & (b != b'\t'))
                }))
            })
            .sum();
        if escaped <= bytes.len() / 3 {
            Self::QuotedPrintable
        } else {
            Self::Base64
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::SevenBit => "7bit",
            Self::QuotedPrintable => "quoted-printable",
            Self::Base64 => "base64",
        }
    }
}

/// A line of `LINE` bytes or more (counting from one line feed to the next).
fn long_line(bytes: &[u8]) -> bool {
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes) {
        if end - start >= LINE {
            return true;
        }
        start = end + 1;
    }
    bytes.len() - start >= LINE
}

/// Writes one part: its headers, a blank line, the encoded body and the CRLF
/// that belongs to the next boundary line (RFC 2046, 5.1.1), so the body's
/// own last line break, or its absence, survives.
pub(super) fn write_part(out: &mut Vec<u8>, content_type: &str, body: &str) {
    let encoding = TransferEncoding::choose(body);
    out.extend_from_slice(b"Content-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Transfer-Encoding: ");
    out.extend_from_slice(encoding.as_str().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    match encoding {
        TransferEncoding::SevenBit => write_crlf(out, body.as_bytes()),
        TransferEncoding::QuotedPrintable => quoted_printable(out, body.as_bytes()),
        TransferEncoding::Base64 => {
            let mut canonical = Vec::with_capacity(body.len() + body.len() / 32);
            write_crlf(&mut canonical, body.as_bytes());
            base64_lines(out, &canonical);
            // Each encoded line ended with CRLF already: the last one is the
            // boundary's.
            return;
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The lines of `body`, split as `str::split` would split at line breaks:
/// `\r\n`, `\n` and a lone `\r` each end a line (as lettre's CRLF
/// normalisation reads them), and a final break leaves an empty last line.
fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(body);
    std::iter::from_fn(move || {
        let text = rest?;
        let Some(end) = memchr::memchr2(b'\n', b'\r', text) else {
            rest = None;
            return Some(text);
        };
        let skip = if text[end] == b'\r' && text.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = Some(&text[end + skip..]);
        Some(&text[..end])
    })
}

/// `body` with CRLF line breaks.
fn write_crlf(out: &mut Vec<u8>, body: &[u8]) {
    for (i, line) in lines(body).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    }
}

fn base64_lines(out: &mut Vec<u8>, data: &[u8]) {
    // 57 input bytes are one full 76-character line.
    for chunk in data.chunks(LINE / 4 * 3) {
        let start = out.len();
        out.resize(start + chunk.len().div_ceil(3) * 4, 0);
        // The slice is exactly as long as the encoding needs.
        let written = STANDARD
            .encode_slice(chunk, &mut out[start..])
            .unwrap_or_default();
        out.truncate(start + written);
        out.extend_from_slice(b"\r\n");
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 2045, 6.7: printable ASCII but `=` as is, the rest `=XX`; a space or
/// tab that ends a line escaped; soft breaks (`=` CRLF) keep lines within
/// 76 characters and never split an escape. Runs of bytes that go as they
/// are are copied whole: a byte at a time, this was the most expensive loop
/// of the worker. One scan over the whole body: a line break is a byte the
/// scan stops at anyway, so the body is not split into lines first.
fn quoted_printable(out: &mut Vec<u8>, body: &[u8]) {
    out.reserve(body.len() + body.len() / 8);
    let line_end = |at: usize| body.get(at).is_none_or(|&b| b == b'\n' || b == b'\r');
    let mut width = 0;
    let mut i = 0;
    while i < body.len() {
        let stop = first_escaped(&body[i..]).map_or(body.len(), |p| i + p);
        let ends_line = line_end(stop);
        // A space or tab that ends the line is escaped.
        let mut end = stop;
        if ends_line && end > i && matches!(body[end - 1], b' ' | b'\t') {
            end -= 1;
        }
        width = copy_run(out, &body[i..end], width, end == stop && ends_line);
        i = end;
        if i < stop || !ends_line {
            width = escape(out, body[i], width, line_end(i + 1));
            i += 1;
            continue;
        }
        if i == body.len() {
            break;
        }
        // `\r\n`, `\n` and a lone `\r` each end a line.
        i += if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        out.extend_from_slice(b"\r\n");
        width = 0;
    }
}

/// Copies `run` (bytes that go as they are) at column `width`, with soft
/// breaks where a line fills; the new column.
fn copy_run(out: &mut Vec<u8>, mut run: &[u8], mut width: usize, ends_line: bool) -> usize {
    while !run.is_empty() {
        let mut room = LINE - 1 - width;
        // The last character of a line may use the column the soft
        // break's `=` would need.
        if ends_line && run.len() == room + 1 {
            room += 1;
        }
        if room == 0 {
            out.extend_from_slice(b"=\r\n");
            width = 0;
            continue;
        }
        let take = run.len().min(room);
        out.extend_from_slice(&run[..take]);
        width += take;
        run = &run[take..];
    }
    width
}

/// Writes `b` as `=XX` at column `width` (after a soft break if it would not
/// fit); the new column.
fn escape(out: &mut Vec<u8>, b: u8, mut width: usize, last_in_line: bool) -> usize {
    let room = if last_in_line { LINE } else { LINE - 1 };
    if width + 3 > room {
        out.extend_from_slice(b"=\r\n");
        width = 0;
    }
    out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
    width + 3
}

/// Where the first byte that is not [`plain`] is, eight bytes at a time: a
/// word with no byte below a space, above `~` or equal to `=` is skipped
/// whole (the tests below can flag a plain byte too, never miss one).
fn first_escaped(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        let x = u64::from_le_bytes(eight);
        let below_space = x.wrapping_sub(ONES * u64::from(b' ')) & !x;
        let above_tilde = x.wrapping_add(ONES * u64::from(0x7f - b'~')) | x;
        let equals = x ^ (ONES * u64::from(b'='));
        let is_equals = equals.wrapping_sub(ONES) & !equals;
        let flagged = (below_space | above_tilde | is_equals) & HIGH;
        if flagged != 0 {
            // The lowest flag is exact: a borrow or carry only runs upward,
            // out of a byte that is flagged itself. A tab is flagged but
            // plain, and may flag the bytes above it: those go one by one.
            let p = (flagged.trailing_zeros() / 8) as usize;
            if word[p] != b'\t' {
                return Some(at + p);
            }
            if let Some(q) = word[p + 1..].iter().position(|&b| !plain(b)) {
                return Some(at + p + 1 + q);
            }
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| !plain(b))
        .map(|p| at + p)
}

/// A byte quoted-printable carries as it is (a space or tab only within a line).
fn plain(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'!'..=b'<' | b'>'..=b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(body: &str) -> (String, String) {
        let mut out = Vec::new();
        write_part(&mut out, "text/plain; charset=utf-8", body);
        let text = String::from_utf8(out).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        (head.to_owned(), body.to_owned())
    }

    /// What a mail reader gets back from `body` encoded as the part of a
    /// multipart message.
    fn decoded(body: &str) -> String {
        let mut out = b"MIME-Version: 1.0\r\n\
            Content-Type: multipart/alternative; boundary=\"=_t\"\r\n\r\n--=_t\r\n"
            .to_vec();
        write_part(&mut out, "text/plain; charset=utf-8", body);
        out.extend_from_slice(b"--=_t--\r\n");
        let parsed = mail_parser::MessageParser::default().parse(&out);
        parsed
            .and_then(|m| m.body_text(0).map(|t| t.into_owned()))
            .unwrap_or_default()
    }

    fn assert_lines_fit(encoded: &str) {
        for line in encoded.split("\r\n") {
            assert!(line.len() <= LINE, "{} > 76: {line:?}", line.len());
        }
    }

    #[test]
    fn short_ascii_lines_go_as_7bit_with_crlf() {
        let (head, body) = part("Hello,\n\nbye\n");
        assert!(head.ends_with("Content-Transfer-Encoding: 7bit"), "{head}");
        assert_eq!(body, "Hello,\r\n\r\nbye\r\n\r\n");
        assert_eq!(decoded("Hello,\n\nbye"), "Hello,\r\n\r\nbye");
        assert_eq!(decoded("Hello,\n\nbye\n"), "Hello,\r\n\r\nbye\r\n");
    }

    #[test]
    fn the_choice_follows_line_length_and_the_share_of_bytes_to_escape() {
        use TransferEncoding::{Base64, QuotedPrintable, SevenBit};
        assert_eq!(TransferEncoding::choose(&"x".repeat(75)), SevenBit);
        assert_eq!(TransferEncoding::choose(&"x".repeat(76)), QuotedPrintable);
        let inner = format!("a\n{}\nb", "x".repeat(76));
        assert_eq!(TransferEncoding::choose(&inner), QuotedPrintable);
        // 1,000 bytes (the count runs over several chunks): up to a third
        // escaped goes quoted-printable, more goes base64.
        let third = format!("{}{}", "é".repeat(166), "x".repeat(668));
        assert_eq!(TransferEncoding::choose(&third), QuotedPrintable);
        let more = format!("{}{}", "é".repeat(167), "x".repeat(666));
        assert_eq!(TransferEncoding::choose(&more), Base64);
    }

    #[test]
    fn a_body_that_could_hold_the_boundary_is_never_7bit() {
        let (head, body) = part("a =_vm line\n");
        assert!(head.ends_with("quoted-printable"), "{head}");
        assert!(!body.contains("=_"), "{body}");
    }

    #[test]
    fn long_ascii_lines_go_quoted_printable_within_76_columns() {
        let line = format!("{}= \t", "x".repeat(200));
        let input = format!("{line}\n.dot\nend ");
        let (head, body) = part(&input);
        assert!(head.ends_with("quoted-printable"), "{head}");
        assert_lines_fit(&body);
        assert!(body.contains("=3D"), "{body}");
        assert!(
            body.ends_with("end=20\r\n"),
            "trailing space escaped: {body}"
        );
        assert_eq!(decoded(&input), format!("{line}\r\n.dot\r\nend "));
    }

    #[test]
    fn an_escape_is_never_split_by_a_soft_break() {
        for pad in 70..80 {
            let input = format!("{}é€x", "a".repeat(pad));
            let (_, body) = part(&input);
            assert_lines_fit(&body);
            for line in body.split("\r\n") {
                let tail = line.rsplit('=').next().unwrap_or_default();
                assert!(
                    line.ends_with('=') || !line.contains('=') || tail.len() >= 2,
                    "{line:?}"
                );
            }
            assert_eq!(decoded(&input), input);
        }
    }

    #[test]
    fn mostly_non_ascii_text_goes_base64() {
        let input = "请确认您的邮箱地址。\n点击下面的链接完成验证。\n".repeat(5);
        let (head, body) = part(&input);
        assert!(head.ends_with("base64"), "{head}");
        assert_lines_fit(&body);
        assert_eq!(decoded(&input), input.replace('\n', "\r\n"));
    }

    #[test]
    fn mixed_text_goes_quoted_printable_and_round_trips() {
        let input = "Hello Zoé,\r\nconfirm: https://example.com/confirm/abc\rend";
        let (head, _) = part(input);
        assert!(head.ends_with("quoted-printable"), "{head}");
        assert_eq!(
            decoded(input),
            "Hello Zoé,\r\nconfirm: https://example.com/confirm/abc\r\nend"
        );
    }

    /// The rule one byte at a time, as first written: the run-copying encoder
    /// must give exactly its bytes.
    fn byte_at_a_time(out: &mut Vec<u8>, body: &[u8]) {
        for (n, line) in lines(body).enumerate() {
            if n > 0 {
                out.extend_from_slice(b"\r\n");
            }
            let mut width = 0;
            for (i, &b) in line.iter().enumerate() {
                let last = i + 1 == line.len();
                let literal = match b {
                    b'=' => false,
                    b' ' | b'\t' => !last,
                    b'!'..=b'~' => true,
                    _ => false,
                };
                let len = if literal { 1 } else { 3 };
                // The last character of a line may use the column the soft
                // break's `=` would need.
                let room = if last { LINE } else { LINE - 1 };
                if width + len > room {
                    out.extend_from_slice(b"=\r\n");
                    width = 0;
                }
                if literal {
                    out.push(b);
                } else {
                    out.extend_from_slice(&[
                        b'=',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 15)],
                    ]);
                }
                width += len;
            }
        }
    }

    #[test]
    fn the_word_scan_finds_the_first_byte_to_escape() {
        for b in 0..=255u8 {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 20];
                bytes[at] = b;
                let want = if plain(b) { None } else { Some(at) };
                assert_eq!(first_escaped(&bytes), want, "byte {b:#04x} at {at}");
                // Nor do tabs before it (plain, but flagged by the word test).
                for tabs in 1..=at.min(3) {
                    bytes[at - tabs] = b'\t';
                    assert_eq!(
                        first_escaped(&bytes),
                        want,
                        "byte {b:#04x} at {at} after {tabs} tabs"
                    );
                }
            }
        }
    }

    #[test]
    fn copying_runs_gives_the_bytes_of_the_byte_at_a_time_rule() {
        let alphabet: [&str; 10] = ["a", "b", " ", "\t", "=", "é", "\n", "\r\n", "€", "\r"];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for case in 0..2_000 {
            let len = case % 300;
            let mut input = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Mostly plain letters, so runs long enough to need soft breaks.
                let pick = (seed % 41) as usize;
                input.push_str(alphabet[if pick < 32 { pick % 2 } else { pick - 31 }]);
            }
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            quoted_printable(&mut fast, input.as_bytes());
            byte_at_a_time(&mut slow, input.as_bytes());
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow),
                "{input:?}"
            );
        }
    }
}

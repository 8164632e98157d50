//! The `Date` header's value, RFC 5322 3.3 with the numeric zone
//! (`Sun, 06 Dec 2026 20:51:32 +0000`), as lettre's `header::Date` writes it.
//!
//! Why by hand: lettre formats through httpdate and `fmt` and then rewrites the
//! zone, several allocations and thousands of instructions for every mail;
//! this is a few integer divisions into a fixed buffer.

use std::time::{SystemTime, UNIX_EPOCH};

/// `Www, DD Mmm YYYY HH:MM:SS +0000`.
pub(super) const LEN: usize = 31;

const WEEKDAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// The date of `time` in UTC. Before 1970 counts as 1970 and the year wraps
/// after 9999, as nothing a clock gives a mail ever reaches either.
pub(super) fn rfc5322(time: SystemTime) -> [u8; LEN] {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil(days);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 +0000";
    // 1970-01-01 was a Thursday.
    out[..3].copy_from_slice(WEEKDAYS[(days % 7) as usize]);
    two_digits(&mut out[5..7], day);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    two_digits(&mut out[12..14], year / 100 % 100);
    two_digits(&mut out[14..16], year % 100);
    two_digits(&mut out[17..19], of_day / 3600);
    two_digits(&mut out[20..22], of_day / 60 % 60);
    two_digits(&mut out[23..25], of_day % 60);
    out
}

fn two_digits(out: &mut [u8], n: u64) {
    out[0] = b'0' + (n / 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31) in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`, for days ≥ 0).
fn civil(days: u64) -> (u64, u64, u64) {
    // Counted from 0000-03-01, so the leap day ends each 400-year era's years.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lettre::message::header::{Date, Headers};

    use super::*;

    /// lettre's value for the same instant.
    fn lettre(time: SystemTime) -> String {
        let mut headers = Headers::new();
        headers.set(Date::new(time));
        headers
            .to_string()
            .trim_start_matches("Date: ")
            .trim_end_matches("\r\n")
            .to_owned()
    }

    fn ours(time: SystemTime) -> String {
        String::from_utf8_lossy(&rfc5322(time)).into_owned()
    }

    #[test]
    fn known_dates() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(ours(at(0)), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(ours(at(951_782_400)), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(ours(at(1_796_589_092)), "Sun, 06 Dec 2026 20:31:32 +0000");
        assert_eq!(ours(at(253_402_300_799)), "Fri, 31 Dec 9999 23:59:59 +0000");
    }

    #[test]
    fn matches_lettre_over_many_instants() {
        // A stride shorter than a day and prime to it: every day of
        // 1970-2199 (leap days too) at shifting times of day; then each
        // second around some turns of the year (2000, 2100, 2001, 2024).
        let mut secs = 0_u64;
        while secs < 7_258_118_400 {
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(ours(time), lettre(time), "{secs}");
            secs += 86_400 / 3 + 7_919;
        }
        for year_start in [946_684_800_u64, 4_102_444_800, 978_307_200, 1_704_067_200] {
            for delta in 0..200 {
                let time = UNIX_EPOCH + Duration::from_secs(year_start - 100 + delta);
                assert_eq!(ours(time), lettre(time), "{}", year_start - 100 + delta);
            }
        }
        let now = SystemTime::now();
        assert_eq!(ours(now), lettre(now));
    }

    #[test]
    fn sub_second_parts_are_dropped_as_lettre_drops_them() {
        let time = UNIX_EPOCH + Duration::from_millis(1_796_589_092_999);
        assert_eq!(ours(time), lettre(time));
    }
}

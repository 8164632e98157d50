//! What a scenario measured (requests, outcomes, mails, duplicates, lost),
//! printed on one line and put in every failing assertion's message.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use verimail_shared::events::VERIFICATION_SENT;
use verimail_tests::smtp::{CapturedMail, mail_request};

use super::tap::{Tap, outcome_label};

/// What a scenario measured.
#[derive(Debug, Default)]
pub struct Figures {
    pub scenario: &'static str,
    pub requests: usize,
    /// Distinct outcome events by label.
    pub outcomes: BTreeMap<String, usize>,
    /// Requests without any outcome.
    pub lost: usize,
    /// Requests with more than one distinct outcome event (a contract breach).
    pub double_outcomes: usize,
    /// Copies of an event received again with the same id (re-publish or tap redelivery).
    pub extra_copies: usize,
    pub mails: usize,
    /// Requests that got no mail though their outcome is `sent`.
    pub sent_without_mail: usize,
    /// Mails beyond the first for one request.
    pub duplicate_mails: usize,
    /// Anything else the scenario wants on the line.
    pub extra: Vec<(String, String)>,
}

impl Figures {
    pub fn measure(
        scenario: &'static str,
        ids: &[String],
        tap: &Tap,
        mails: &[CapturedMail],
    ) -> Self {
        let outcomes = tap.outcomes();
        let mut f = Self {
            scenario,
            requests: ids.len(),
            extra_copies: tap.extra_copies(),
            mails: mails.len(),
            ..Self::default()
        };
        let mut per_request: HashMap<String, usize> = HashMap::new();
        for m in mails {
            *per_request.entry(mail_request(m)).or_default() += 1;
        }
        f.duplicate_mails = per_request.values().map(|n| n.saturating_sub(1)).sum();
        for id in ids {
            match outcomes.get(id) {
                None => f.lost += 1,
                Some(list) => {
                    if list.len() > 1 {
                        f.double_outcomes += 1;
                    }
                    for e in list {
                        *f.outcomes.entry(outcome_label(e)).or_default() += 1;
                    }
                    if list.iter().any(|e| e["type"] == VERIFICATION_SENT)
                        && !per_request.contains_key(id)
                    {
                        f.sent_without_mail += 1;
                    }
                }
            }
        }
        f
    }

    pub fn note(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.extra.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn print(&self) {
        println!("[faults] {self}");
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: requests={} outcomes={:?} lost={} double_outcomes={} extra_copies={} \
             mails={} duplicate_mails={} sent_without_mail={}",
            self.scenario,
            self.requests,
            self.outcomes,
            self.lost,
            self.double_outcomes,
            self.extra_copies,
            self.mails,
            self.duplicate_mails,
            self.sent_without_mail
        )?;
        for (k, v) in &self.extra {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

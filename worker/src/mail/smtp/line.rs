//! The line of mails waiting for an SMTP connection, and its hand-over.
//!
//! At most `slots` senders hold a connection at once (the pool's size). A
//! sender that finds them all taken joins the line, with a copy of its mail
//! when a holder could carry it, and waits for one of two answers: its
//! mail's result, when a holder sent it in one write with its own (the
//! pool's `send`), or the slot itself, handed over by a holder leaving with
//! the line not empty. So the work
//! stays in the tasks of the deliveries: no task of its own per connection,
//! no hop to one and back per mail.
//!
//! Nothing is lost when a future is dropped (its attempt's deadline, or a
//! shutdown): a holder's [`Slot`] hands the slot on when dropped, a waiter
//! dropped with the slot in its hands hands it on too, a waiter that left
//! is skipped, and the mails a dropped holder had taken from the line get
//! [`SendError::Unanswered`] (retried, as any transient failure).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope as SmtpEnvelope;
use tokio::sync::oneshot;

use super::lock;
use crate::mail::SendError;

/// The line, and how many slots are held.
pub(super) struct Line {
    slots: usize,
    state: Mutex<State>,
}

struct State {
    held: usize,
    waiting: VecDeque<Waiting>,
}

/// A sender in the line.
struct Waiting {
    /// A copy of its mail, if another holder may send it.
    mail: Option<(SmtpEnvelope, String)>,
    /// When it joined the line: its sender's deadline runs from about then.
    entered: Instant,
    answer: oneshot::Sender<Answer>,
}

/// A mail taken from the line, for its holder to send and answer.
pub(super) struct Taken {
    pub(super) envelope: SmtpEnvelope,
    pub(super) text: String,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    Sent(Result<(), SendError>),
    Lead,
}

/// What a sender gets on entering the line.
pub(super) enum Entry<'a> {
    /// A slot was free: send.
    Lead(Slot<'a>),
    /// Wait for [`Waiter::turn`].
    Wait(Waiter<'a>),
}

/// What a waiting sender gets in the end.
pub(super) enum Turn<'a> {
    /// Its mail was sent by a holder, with this result.
    Sent(Result<(), SendError>),
    /// A slot was handed over: send.
    Lead(Slot<'a>),
}

/// A held slot; dropping it hands it to the first sender still waiting, or
/// frees it.
pub(super) struct Slot<'a>(&'a Line);

/// A place in the line.
pub(super) struct Waiter<'a> {
    line: &'a Line,
    answer: oneshot::Receiver<Answer>,
}

impl Line {
    pub(super) fn new(slots: usize) -> Self {
        Self {
            slots,
            state: Mutex::new(State {
                held: 0,
                waiting: VecDeque::new(),
            }),
        }
    }

    /// A free slot, or a place in the line, with a copy of `mail` if given
    /// (only a mail a holder may carry is worth the copy).
    pub(super) fn enter(&self, mail: Option<(&SmtpEnvelope, &str)>) -> Entry<'_> {
        let mut state = lock(&self.state);
        if state.held < self.slots {
            state.held += 1;
            return Entry::Lead(Slot(self));
        }
        let (answer, receiver) = oneshot::channel();
        state.waiting.push_back(Waiting {
            mail: mail.map(|(envelope, text)| (envelope.clone(), text.to_owned())),
            entered: Instant::now(),
            answer,
        });
        Entry::Wait(Waiter {
            line: self,
            answer: receiver,
        })
    }

    /// Takes up to `n` mails from the front of the line that came with a
    /// copy, joined it less than `within` ago, and `fits` accepts, whose
    /// senders still wait; the others keep their places.
    pub(super) fn take(
        &self,
        n: usize,
        within: Duration,
        fits: impl Fn(&SmtpEnvelope, &str) -> bool,
    ) -> Vec<Taken> {
        let mut taken = Vec::new();
        let mut state = lock(&self.state);
        let mut i = 0;
        while taken.len() < n && i < state.waiting.len() {
            let w = &state.waiting[i];
            if w.answer.is_closed() {
                // Its sender left: drop the place.
                state.waiting.remove(i);
                continue;
            }
            let carried = w.entered.elapsed() < within
                && w.mail.as_ref().is_some_and(|(e, text)| fits(e, text));
            if !carried {
                i += 1;
                continue;
            }
            if let Some(Waiting {
                mail: Some((envelope, text)),
                answer,
                ..
            }) = state.waiting.remove(i)
            {
                taken.push(Taken {
                    envelope,
                    text,
                    answer,
                });
            }
        }
        taken
    }

    /// Hands a slot to the first sender still waiting, or frees it.
    fn leave(&self) {
        let mut state = lock(&self.state);
        while let Some(w) = state.waiting.pop_front() {
            if w.answer.send(Answer::Lead).is_ok() {
                return;
            }
        }
        state.held -= 1;
    }
}

impl Taken {
    /// Tells the waiting sender its mail's result (nobody hears it if the
    /// sender has given up meanwhile).
    pub(super) fn answer(self, result: Result<(), SendError>) {
        let _ = self.answer.send(Answer::Sent(result));
    }
}

impl<'a> Waiter<'a> {
    /// Waits for the mail's result or a slot.
    pub(super) async fn turn(mut self) -> Turn<'a> {
        match (&mut self.answer).await {
            Ok(Answer::Sent(result)) => Turn::Sent(result),
            Ok(Answer::Lead) => Turn::Lead(Slot(self.line)),
            // The holder that took the mail was dropped mid-exchange.
            Err(_) => Turn::Sent(Err(SendError::Unanswered)),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Dropped while a slot was being handed over: pass it on.
        self.answer.close();
        if let Ok(Answer::Lead) = self.answer.try_recv() {
            self.line.leave();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> SmtpEnvelope {
        let to = "to@example.com".parse().ok();
        SmtpEnvelope::new(None, to.into_iter().collect()).expect("an envelope")
    }

    /// Enters with a copy of a mail whose text is `text`; the slot if one was free.
    fn enter<'a>(line: &'a Line, text: &str) -> Result<Slot<'a>, Waiter<'a>> {
        match line.enter(Some((&envelope(), text))) {
            Entry::Lead(slot) => Ok(slot),
            Entry::Wait(waiter) => Err(waiter),
        }
    }

    #[tokio::test]
    async fn a_slot_left_goes_to_the_first_sender_still_waiting() {
        let line = Line::new(1);
        let slot = enter(&line, "a").ok().expect("the first sender leads");
        let gone = enter(&line, "b").err().expect("the second waits");
        let next = enter(&line, "c").err().expect("the third waits");
        drop(gone);
        drop(slot);
        assert!(matches!(next.turn().await, Turn::Lead(_)));
        // Both slots' holders gone: the line is free again.
        assert!(matches!(line.enter(None), Entry::Lead(_)));
    }

    #[tokio::test]
    async fn a_waiter_dropped_with_the_slot_in_its_hands_hands_it_on() {
        let line = Line::new(1);
        let slot = enter(&line, "a").ok().expect("the first sender leads");
        let first = enter(&line, "b").err().expect("waits");
        let second = enter(&line, "c").err().expect("waits");
        // The slot is handed to `first`, which gives up before reading it.
        drop(slot);
        drop(first);
        assert!(matches!(second.turn().await, Turn::Lead(_)));
    }

    #[tokio::test]
    async fn taken_mails_get_their_answers_and_a_dropped_holder_leaves_them_unanswered() {
        let line = Line::new(1);
        let slot = enter(&line, "a").ok().expect("leads");
        let sent = enter(&line, "sent").err().expect("waits");
        let skipped = enter(&line, "not this one").err().expect("waits");
        let Entry::Wait(uncopied) = line.enter(None) else {
            panic!("waits");
        };
        let lost = enter(&line, "lost").err().expect("waits");
        let mut taken = line.take(5, Duration::MAX, |_, text| text != "not this one");
        assert_eq!(taken.len(), 2, "only mails that came with a copy, and fit");
        assert_eq!(taken[0].text, "sent");
        taken.remove(0).answer(Ok(()));
        assert!(matches!(sent.turn().await, Turn::Sent(Ok(()))));
        // The holder is dropped before answering the mail it took.
        drop(taken);
        assert!(matches!(
            lost.turn().await,
            Turn::Sent(Err(SendError::Unanswered))
        ));
        // The mails it did not take keep their places and get the slot in turn.
        drop(slot);
        let Turn::Lead(slot) = skipped.turn().await else {
            panic!("the slot expected");
        };
        drop(slot);
        assert!(matches!(uncopied.turn().await, Turn::Lead(_)));
    }

    #[tokio::test]
    async fn a_mail_that_waited_too_long_is_not_taken() {
        let line = Line::new(1);
        let _slot = enter(&line, "a").ok().expect("leads");
        let _waiting = enter(&line, "b").err().expect("waits");
        assert!(line.take(5, Duration::ZERO, |_, _| true).is_empty());
        assert_eq!(line.take(5, Duration::MAX, |_, _| true).len(), 1);
    }
}

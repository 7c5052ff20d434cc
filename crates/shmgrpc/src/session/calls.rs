//! Per-call accounting of what we sent (protocol version 3, §7): which message of which call each reference of
//! ours stands for, so that a `CallEnd` from the peer (its incoming stream of that call ended after `received`
//! messages) finds the holds and sent-back regions of the messages that never arrived.
//!
//! HTTP/2 discards the messages of a cancelled stream that its receiver had not read: the receiver cannot answer
//! them, and without call numbers the sender could not tell them from messages being read. [`MessageTag`] is
//! shared by every hold and sent-back region of one message; [`Calls`] finds the tags by call and index (weakly:
//! a tag goes when the peer has answered everything it names).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use crate::proto::v1;

/// Which message of which call a reference of ours stands for, and its parts.
#[derive(Debug)]
pub(crate) struct MessageTag {
    pub(super) call: u64,
    pub(super) index: u64,
    pub(super) parts: Vec<v1::Part>,
}

/// A call with a live outgoing body of ours.
#[derive(Debug, Default)]
struct Open {
    bodies: u32,
    /// The peer's `CallEnd`: messages from this index on never arrive.
    ended: Option<u64>,
}

/// The calls of one session we send messages in (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Calls {
    open: HashMap<u64, Open>,
    sent: HashMap<u64, BTreeMap<u64, Weak<MessageTag>>>,
    /// Entries of `sent`, and the count at which dead ones are swept next.
    entries: usize,
    sweep_at: usize,
}

/// `sent` is swept of tags nobody holds any more when it reaches this many entries (or twice the live ones).
const FIRST_SWEEP: usize = 1024;

impl Calls {
    /// An outgoing body of `call` begins.
    pub(super) fn open(&mut self, call: u64) {
        self.open.entry(call).or_default().bodies += 1;
    }

    /// An outgoing body of `call` is gone: later `CallEnd`s find only what it sent.
    pub(super) fn close(&mut self, call: u64) {
        if let Some(o) = self.open.get_mut(&call) {
            o.bodies -= 1;
            if o.bodies == 0 {
                self.open.remove(&call);
            }
        }
    }

    /// Records a message sent with holds or sent-back regions; `false` if the peer already ended its call before
    /// this message (then it never arrives, and its holds go at once).
    pub(super) fn record(&mut self, tag: &Arc<MessageTag>) -> bool {
        if self.open.get(&tag.call).and_then(|o| o.ended).is_some_and(|k| tag.index >= k) {
            return false;
        }
        if self.entries >= self.sweep_at.max(FIRST_SWEEP) {
            self.sweep();
        }
        self.sent.entry(tag.call).or_default().insert(tag.index, Arc::downgrade(tag));
        self.entries += 1;
        true
    }

    /// The peer read only the first `received` messages of `call`: the tags of the others we still have something
    /// held for.
    pub(super) fn end(&mut self, call: u64, received: u64) -> Vec<Arc<MessageTag>> {
        if let Some(o) = self.open.get_mut(&call) {
            o.ended = Some(o.ended.map_or(received, |k| k.min(received)));
        }
        let Some(messages) = self.sent.get_mut(&call) else { return Vec::new() };
        let lost = messages.split_off(&received);
        if messages.is_empty() {
            self.sent.remove(&call);
        }
        self.entries -= lost.len();
        lost.into_values().filter_map(|w| w.upgrade()).collect()
    }

    /// Drops the entries of messages whose holds are all gone.
    fn sweep(&mut self) {
        self.sent.retain(|_, messages| {
            messages.retain(|_, w| w.strong_count() > 0);
            !messages.is_empty()
        });
        self.entries = self.sent.values().map(BTreeMap::len).sum();
        self.sweep_at = self.entries * 2;
    }

    /// Forgets everything (the session closed).
    pub(super) fn clear(&mut self) {
        self.sent.clear();
        self.entries = 0;
    }

    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(call: u64, index: u64) -> Arc<MessageTag> {
        Arc::new(MessageTag { call, index, parts: Vec::new() })
    }

    #[test]
    fn a_call_end_finds_the_request_of_a_unary_call_that_was_never_opened() {
        // A client's unary call (`CoreSession::unary_call`) sends its one request before the peer knows the call,
        // and stays out of the ledger of open calls: a `CallEnd` still finds what that request holds.
        let mut calls = Calls::default();
        let request = tag(9, 0);
        assert!(calls.record(&request));
        let lost = calls.end(9, 0);
        assert_eq!(lost.len(), 1);
        assert!(Arc::ptr_eq(&lost[0], &request));
        calls.close(9);
        assert_eq!(calls.tracked(), 0);
    }

    #[test]
    fn a_call_end_finds_the_messages_after_what_the_peer_received_and_only_those() {
        let mut calls = Calls::default();
        calls.open(7);
        let tags: Vec<_> = (0..5).map(|i| tag(7, i)).collect();
        let other = tag(8, 3);
        for t in tags.iter().chain([&other]) {
            assert!(calls.record(t));
        }
        let lost = calls.end(7, 2);
        let mut indices: Vec<u64> = lost.iter().map(|t| t.index).collect();
        indices.sort_unstable();
        assert_eq!(indices, [2, 3, 4]);
        assert!(lost.iter().all(|t| t.call == 7));
        assert!(calls.end(7, 0).iter().map(|t| t.index).eq([0, 1]), "the rest on a second, lower end");
        assert!(calls.end(7, 0).is_empty(), "nothing twice");
        assert_eq!(calls.end(8, 0).len(), 1, "another call's message is its own");
    }

    #[test]
    fn messages_sent_after_the_peer_ended_the_call_are_not_recorded() {
        let mut calls = Calls::default();
        calls.open(1);
        assert!(calls.end(1, 3).is_empty());
        assert!(calls.record(&tag(1, 2)), "received before the end");
        assert!(!calls.record(&tag(1, 3)), "sent after the peer stopped reading");
        calls.close(1);
        assert!(calls.record(&tag(1, 9)), "the end is remembered only while the body lives");
    }

    #[test]
    fn released_messages_are_swept_so_the_ledger_stays_bounded() {
        let mut calls = Calls::default();
        let live = tag(1, 0);
        calls.record(&live);
        for i in 1..10_000 {
            calls.record(&tag(1, i)); // dropped at once: released
        }
        assert!(calls.tracked() <= FIRST_SWEEP, "{} entries", calls.tracked());
        assert_eq!(calls.end(1, 0).len(), 1);
    }
}

//! The tickets waiting on this replica, as a pure state machine: which
//! sidecar stream waits on which ToolCallApproval, and what happens to them
//! when the object changes ([`TicketBook::on_standing`]). The shell turns its
//! steps into API calls and `ApprovalStatus` messages.
//!
//! A ticket is opened when the request arrives (before the object is found or
//! created, so that a release that overtakes the API calls still counts),
//! attached to an object once there is one, and closed by its final answer,
//! a release, or the end of its stream. One object's tickets are served in
//! arrival order: the oldest waiting ticket is the one an approval is
//! consumed for; the others then fail (the approval was used).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::core::Standing;

/// A sidecar stream of this replica.
pub type StreamId = u64;

/// Most tickets one stream may have open at once.
pub const MAX_TICKETS_PER_STREAM: usize = 256;

/// One ticket: the stream it came on and the sidecar's number for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketKey {
    /// The stream.
    pub stream: StreamId,
    /// The sidecar's ticket number.
    pub ticket: u64,
}

/// An approval object: (namespace, name).
pub type ObjectName = (String, String);

#[derive(Clone, Debug)]
struct Ticket {
    /// Arrival order.
    seq: u64,
    /// The pod whose call it is (the `consumedBy` if it wins).
    pod: String,
    /// The object it waits on, once found or created.
    object: Option<ObjectName>,
}

/// Why a ticket could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TicketRefused {
    /// The stream already has this ticket open.
    #[error("ticket {0} is already waiting on this stream")]
    Duplicate(u64),
    /// The stream has too many tickets open.
    #[error("this sidecar already waits on {MAX_TICKETS_PER_STREAM} approvals")]
    TooMany,
}

/// What to do about the tickets of an object after it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketStep {
    /// Nothing now: pending, nobody waits, or a consume is in flight.
    Wait,
    /// Consume the approval for this ticket (of `pod`); then report the
    /// result with [`TicketBook::consume_done`].
    Consume {
        /// The oldest waiting ticket.
        ticket: TicketKey,
        /// Its pod.
        pod: String,
    },
    /// These tickets are done: each gets the object's final answer.
    Finish(Vec<TicketKey>),
}

/// How a consume attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeResult {
    /// The approval is used for the ticket.
    Won,
    /// The object changed first (another replica or ticket used it, or a
    /// person changed it): evaluate its new version.
    Conflict,
    /// The write failed for another reason.
    Failed,
}

/// Where the tickets go after a consume attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumeOutcome {
    /// Gets GRANTED (when the attempt won and the ticket still waits).
    pub granted: Option<TicketKey>,
    /// Get FAILED: the approval was used for another ticket, or (the
    /// attempt failed) the one it was tried for.
    pub failed: Vec<TicketKey>,
}

/// The waiting tickets of this replica.
#[derive(Debug, Default)]
pub struct TicketBook {
    tickets: HashMap<TicketKey, Ticket>,
    /// Attached tickets per object, in arrival order.
    by_object: BTreeMap<ObjectName, BTreeSet<(u64, TicketKey)>>,
    /// Open tickets per stream.
    per_stream: HashMap<StreamId, usize>,
    /// Objects with a consume in flight.
    consuming: BTreeSet<ObjectName>,
    next_seq: u64,
}

impl TicketBook {
    /// Opens `key` for `pod`'s call (not yet attached to an object).
    pub fn open(&mut self, key: TicketKey, pod: &str) -> Result<(), TicketRefused> {
        if self.tickets.contains_key(&key) {
            return Err(TicketRefused::Duplicate(key.ticket));
        }
        let open = self.per_stream.entry(key.stream).or_default();
        if *open >= MAX_TICKETS_PER_STREAM {
            return Err(TicketRefused::TooMany);
        }
        *open += 1;
        self.next_seq += 1;
        self.tickets.insert(
            key,
            Ticket {
                seq: self.next_seq,
                pod: pod.to_owned(),
                object: None,
            },
        );
        Ok(())
    }

    /// Attaches `key` to `object`; `false` when the ticket is no longer open
    /// (released, or its stream ended, meanwhile).
    pub fn attach(&mut self, key: TicketKey, object: ObjectName) -> bool {
        let Some(ticket) = self.tickets.get_mut(&key) else {
            return false;
        };
        if let Some(old) = ticket.object.replace(object.clone())
            && let Some(set) = self.by_object.get_mut(&old)
        {
            set.remove(&(ticket.seq, key));
        }
        self.by_object
            .entry(object)
            .or_default()
            .insert((ticket.seq, key));
        true
    }

    /// Whether `key` is open.
    pub fn is_open(&self, key: TicketKey) -> bool {
        self.tickets.contains_key(&key)
    }

    /// Closes `key` (released, answered, or failed); `true` when it was open.
    pub fn close(&mut self, key: TicketKey) -> bool {
        let Some(ticket) = self.tickets.remove(&key) else {
            return false;
        };
        if let Some(object) = &ticket.object
            && let Some(set) = self.by_object.get_mut(object)
        {
            set.remove(&(ticket.seq, key));
            if set.is_empty() {
                self.by_object.remove(object);
            }
        }
        if let Some(open) = self.per_stream.get_mut(&key.stream) {
            *open -= 1;
            if *open == 0 {
                self.per_stream.remove(&key.stream);
            }
        }
        true
    }

    /// Closes every ticket of `stream` (it ended).
    pub fn close_stream(&mut self, stream: StreamId) {
        let keys: Vec<TicketKey> = self
            .tickets
            .keys()
            .filter(|k| k.stream == stream)
            .copied()
            .collect();
        for key in keys {
            self.close(key);
        }
    }

    /// The tickets attached to `object`, oldest first.
    pub fn waiting_on(&self, object: &ObjectName) -> Vec<TicketKey> {
        self.by_object
            .get(object)
            .map(|set| set.iter().map(|(_, k)| *k).collect())
            .unwrap_or_default()
    }

    /// What to do now that `object` stands at `standing`. Approved with
    /// tickets waiting and no consume in flight: consume it for the oldest
    /// (the object is marked as being consumed). Final: every waiting ticket
    /// is closed and returned, to be answered.
    pub fn on_standing(&mut self, object: &ObjectName, standing: &Standing) -> TicketStep {
        if self.consuming.contains(object) {
            return TicketStep::Wait;
        }
        let waiting = self.waiting_on(object);
        let Some(first) = waiting.first().copied() else {
            return TicketStep::Wait;
        };
        match standing {
            Standing::Pending { .. } => TicketStep::Wait,
            Standing::Approved { .. } => {
                self.consuming.insert(object.clone());
                let pod = self.tickets[&first].pod.clone();
                TicketStep::Consume { ticket: first, pod }
            }
            _ => {
                for key in &waiting {
                    self.close(*key);
                }
                TicketStep::Finish(waiting)
            }
        }
    }

    /// `object` was deleted: its waiting tickets are closed and returned (to
    /// be answered FAILED).
    pub fn on_deleted(&mut self, object: &ObjectName) -> Vec<TicketKey> {
        self.consuming.remove(object);
        let waiting = self.waiting_on(object);
        for key in &waiting {
            self.close(*key);
        }
        waiting
    }

    /// The consume of `object` for `ticket` ended with `result`. Won: the
    /// ticket is granted (if still open) and every other ticket on the object
    /// fails. Conflict: nothing is answered; re-evaluate the object's current
    /// version with [`TicketBook::on_standing`]. Failed: the ticket fails,
    /// the others keep waiting.
    pub fn consume_done(
        &mut self,
        object: &ObjectName,
        ticket: TicketKey,
        result: ConsumeResult,
    ) -> ConsumeOutcome {
        self.consuming.remove(object);
        match result {
            ConsumeResult::Won => {
                let granted = self.close(ticket).then_some(ticket);
                let failed = self.waiting_on(object);
                for key in &failed {
                    self.close(*key);
                }
                ConsumeOutcome { granted, failed }
            }
            ConsumeResult::Conflict => ConsumeOutcome::default(),
            ConsumeResult::Failed => ConsumeOutcome {
                granted: None,
                failed: self.close(ticket).then_some(ticket).into_iter().collect(),
            },
        }
    }

    /// Open tickets (for tests and metrics).
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// Whether no ticket is open.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }
}

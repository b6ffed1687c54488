//! The index as the controller's tasks share it: the watch tasks change it,
//! the snapshot server and the status writer read it, and a `watch` channel
//! ticks after every change so that the status writer wakes up.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::Index;
use crate::metrics::Metrics;

/// The index shared by the watch tasks, the snapshot server and the status
/// writer, with a channel that ticks whenever it changed.
pub struct SharedIndex {
    index: Mutex<Index>,
    changed: watch::Sender<u64>,
    synced: watch::Sender<u8>,
    metrics: Arc<Metrics>,
}

impl SharedIndex {
    /// An empty shared index that reports its changes to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            index: Mutex::new(Index::new()),
            changed: watch::channel(0).0,
            synced: watch::channel(0).0,
            metrics,
        })
    }

    /// Locks the index for reading; changes go through [`SharedIndex::update`],
    /// which also wakes the status writer.
    pub fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change`, counts it and tells the status writer; whether it
    /// changed the index.
    pub fn update(&self, change: impl FnOnce(&mut Index)) -> bool {
        let (generation, last_version) = {
            let mut index = self.lock();
            change(&mut index);
            (index.generation(), index.last_version())
        };
        // Only a real change is counted and wakes the status writer: an
        // unchanged object (our own status write coming back) is neither.
        let changed = self
            .changed
            .send_if_modified(|current| std::mem::replace(current, generation) != generation);
        if changed {
            self.metrics.index_updated(last_version);
        }
        changed
    }

    /// Ticks after every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// True once all three kinds have been listed.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow() >= 3
    }

    /// Records that one more of the three kinds has been listed (each
    /// kind's watch calls it once, after its first complete list).
    pub(crate) fn kind_synced(&self) {
        self.synced.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use chaperone_policy::model::{AgentIdentitySpec, Object};

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn identity(name: &str) -> Object<AgentIdentitySpec> {
        crate::test_objects::identity("a", name)
    }

    /// The value of the unlabelled metric `name` in the text exposition.
    fn metric(metrics: &Metrics, name: &str) -> u64 {
        let text = metrics.render();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} not in {text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn changes_move_index_updates_and_snapshot_version_and_no_ops_do_not() {
        let metrics = Metrics::new();
        let shared = SharedIndex::new(metrics.clone());
        assert_eq!(
            metric(&metrics, "chaperone_controller_index_updates_total"),
            0
        );
        assert_eq!(metric(&metrics, "chaperone_controller_snapshot_version"), 0);

        shared.update(|index| index.apply_identity(identity("planner"), NOW));
        let first = shared.lock().last_version();
        assert!(first > 0);
        assert_eq!(
            metric(&metrics, "chaperone_controller_index_updates_total"),
            1
        );
        assert_eq!(
            metric(&metrics, "chaperone_controller_snapshot_version"),
            first
        );

        // Our own status write coming back: the same object, not a change.
        shared.update(|index| index.apply_identity(identity("planner"), NOW));
        assert_eq!(
            metric(&metrics, "chaperone_controller_index_updates_total"),
            1
        );

        shared.update(|index| index.apply_identity(identity("worker"), NOW));
        let second = shared.lock().last_version();
        assert!(second > first);
        assert_eq!(
            metric(&metrics, "chaperone_controller_index_updates_total"),
            2
        );
        assert_eq!(
            metric(&metrics, "chaperone_controller_snapshot_version"),
            second
        );
    }
}

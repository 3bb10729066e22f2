//! Locks: Buildbot's MasterLock and WorkerLock, counting or exclusive,
//! as the distributor takes them when a build starts and gives them back
//! when it ends.

use std::collections::{HashMap, HashSet};

use crate::config::{LockAccess, LockMode, LockScope};

#[derive(Default)]
pub(super) struct Busy {
    /// worker → builders it is building now
    pub(super) running: HashMap<String, HashSet<String>>,
    /// (lock name, worker for a WorkerLock) → holders
    locks: HashMap<(String, Option<String>), LockState>,
}

#[derive(Default)]
struct LockState {
    counting: u32,
    exclusive: bool,
}

fn lock_key(a: &LockAccess, worker: &str) -> (String, Option<String>) {
    match a.scope {
        LockScope::Master => (a.name.clone(), None),
        LockScope::Worker => (a.name.clone(), Some(worker.to_string())),
    }
}

impl Busy {
    /// Whether every lock of `accesses` can be taken on `worker` now
    /// (Buildbot's rules: counting up to maxCount holders; exclusive alone).
    pub(super) fn can_lock(&self, accesses: &[LockAccess], worker: &str) -> bool {
        accesses.iter().all(|a| {
            let st = self.locks.get(&lock_key(a, worker));
            let (counting, exclusive) = st.map_or((0, false), |s| (s.counting, s.exclusive));
            match a.mode {
                LockMode::Counting => !exclusive && counting < a.max_count.max(1),
                LockMode::Exclusive => !exclusive && counting == 0,
            }
        })
    }

    pub(super) fn take_locks(&mut self, accesses: &[LockAccess], worker: &str) {
        for a in accesses {
            let st = self.locks.entry(lock_key(a, worker)).or_default();
            match a.mode {
                LockMode::Counting => st.counting += 1,
                LockMode::Exclusive => st.exclusive = true,
            }
        }
    }

    pub(super) fn release_locks(&mut self, accesses: &[LockAccess], worker: &str) {
        for a in accesses {
            if let Some(st) = self.locks.get_mut(&lock_key(a, worker)) {
                match a.mode {
                    LockMode::Counting => st.counting = st.counting.saturating_sub(1),
                    LockMode::Exclusive => st.exclusive = false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(name: &str, mode: LockMode, scope: LockScope, max_count: u32) -> LockAccess {
        LockAccess {
            name: name.into(),
            mode,
            scope,
            max_count,
        }
    }

    #[test]
    fn a_counting_lock_admits_up_to_max_count_holders() {
        let two = [access("l", LockMode::Counting, LockScope::Master, 2)];
        let mut busy = Busy::default();
        assert!(busy.can_lock(&two, "w1"));
        busy.take_locks(&two, "w1");
        assert!(busy.can_lock(&two, "w2"));
        busy.take_locks(&two, "w2");
        assert!(
            !busy.can_lock(&two, "w3"),
            "a third holder of a 2-count lock"
        );
        busy.release_locks(&two, "w1");
        assert!(busy.can_lock(&two, "w3"));
    }

    #[test]
    fn an_exclusive_lock_excludes_every_other_holder() {
        let excl = [access("l", LockMode::Exclusive, LockScope::Master, 1)];
        let count = [access("l", LockMode::Counting, LockScope::Master, 5)];
        let mut busy = Busy::default();
        busy.take_locks(&count, "w1");
        assert!(!busy.can_lock(&excl, "w2"), "exclusive while counted");
        busy.release_locks(&count, "w1");
        assert!(busy.can_lock(&excl, "w2"));
        busy.take_locks(&excl, "w2");
        assert!(!busy.can_lock(&count, "w1"), "counted while exclusive");
        assert!(!busy.can_lock(&excl, "w1"), "two exclusive holders");
        busy.release_locks(&excl, "w2");
        assert!(busy.can_lock(&count, "w1") && busy.can_lock(&excl, "w1"));
    }

    #[test]
    fn a_worker_lock_is_held_per_worker_and_a_master_lock_across_workers() {
        let wl = [access("w", LockMode::Exclusive, LockScope::Worker, 1)];
        let ml = [access("m", LockMode::Exclusive, LockScope::Master, 1)];
        let mut busy = Busy::default();
        busy.take_locks(&wl, "w1");
        busy.take_locks(&ml, "w1");
        assert!(busy.can_lock(&wl, "w2"), "a WorkerLock on another worker");
        assert!(!busy.can_lock(&wl, "w1"));
        assert!(!busy.can_lock(&ml, "w2"), "a MasterLock on another worker");
    }

    #[test]
    fn every_lock_of_a_builder_must_be_free() {
        let both = [
            access("a", LockMode::Counting, LockScope::Master, 3),
            access("b", LockMode::Exclusive, LockScope::Master, 1),
        ];
        let mut busy = Busy::default();
        busy.take_locks(&both[1..], "w1");
        assert!(!busy.can_lock(&both, "w2"));
        busy.release_locks(&both[1..], "w1");
        assert!(busy.can_lock(&both, "w2"));
    }

    #[test]
    fn a_max_count_of_zero_still_admits_one_holder() {
        let zero = [access("l", LockMode::Counting, LockScope::Master, 0)];
        let mut busy = Busy::default();
        assert!(busy.can_lock(&zero, "w1"));
        busy.take_locks(&zero, "w1");
        assert!(!busy.can_lock(&zero, "w1"));
    }
}

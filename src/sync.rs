//! Locks that outlive a panic. A thread that panics while holding one of
//! kiln's mutexes or read-write locks leaves its data at worst partly
//! updated (a counter, a map of what runs), never in a state the next
//! holder cannot read, so poisoning is ignored rather than spread: one
//! failed build or request must not stop the master.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

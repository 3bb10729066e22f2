//! Heap accounting per thread, so that a script's memory can be bounded.
//!
//! Rhai's own size limits (`set_max_array_size` and friends) re-measure a
//! container after every mutation of it, which makes building a list of N
//! builder names O(N²). kiln instead counts the bytes each thread holds
//! (allocated minus freed, through a thin wrapper over the system
//! allocator) and checks that count against a [`Budget`] between script
//! operations, which costs one thread-local read per operation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The global allocator: the system's, plus per-thread byte counts.
pub struct Meter;

thread_local! {
    static NET: Cell<isize> = const { Cell::new(0) };
    /// The active budget on this thread: (count when it began, limit).
    static BUDGET: Cell<Option<(isize, usize)>> = const { Cell::new(None) };
}

fn count(delta: isize) {
    // `try_with` fails only while the thread is being torn down.
    let _ = NET.try_with(|n| n.set(n.get().wrapping_add(delta)));
}

// SAFETY: every call is forwarded unchanged to `System`; the wrapper only
// adds bookkeeping that neither allocates nor unwinds.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

fn net() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// While alive, bounds the bytes this thread may hold beyond what it held
/// when the budget began. Budgets nest; dropping one restores the outer.
pub struct Budget {
    outer: Option<(isize, usize)>,
}

impl Budget {
    pub fn enter(limit: usize) -> Budget {
        let outer = BUDGET.with(|b| b.replace(Some((net(), limit))));
        Budget { outer }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        BUDGET.with(|b| b.set(self.outer));
    }
}

/// Bytes held beyond the active budget's start, and its limit.
fn usage() -> Option<(usize, usize)> {
    let (base, limit) = BUDGET.with(Cell::get)?;
    Some((net().saturating_sub(base).max(0) as usize, limit))
}

/// The limit, when this thread has gone over its budget.
pub fn over_budget() -> Option<usize> {
    usage().and_then(|(used, limit)| (used > limit).then_some(limit))
}

/// The limit, when `bytes` more would not fit in this thread's budget
/// (never without one).
pub fn would_exceed(bytes: usize) -> Option<usize> {
    match usage() {
        Some((used, limit)) if used.saturating_add(bytes) > limit => Some(limit),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_sees_what_its_thread_holds() {
        let _b = Budget::enter(1 << 20);
        assert_eq!(over_budget(), None);
        let small = vec![0u8; 1 << 19];
        assert_eq!(over_budget(), None);
        let big = vec![0u8; 1 << 20];
        assert_eq!(over_budget(), Some(1 << 20));
        drop(big);
        assert_eq!(over_budget(), None);
        assert_eq!(would_exceed(1 << 20), Some(1 << 20));
        assert_eq!(would_exceed(1 << 10), None);
        drop(small);
    }

    #[test]
    fn budgets_nest_and_none_means_unbounded() {
        assert_eq!(would_exceed(usize::MAX), None);
        {
            let _outer = Budget::enter(1 << 30);
            {
                let _inner = Budget::enter(10);
                let v = vec![0u8; 100];
                assert_eq!(over_budget(), Some(10));
                drop(v);
            }
            let v = vec![0u8; 100];
            assert_eq!(over_budget(), None);
            drop(v);
        }
        assert_eq!(would_exceed(usize::MAX), None);
    }
}

//! Wrong passwords cost time: each address that sent wrong credentials
//! (a worker's handshake, a web user's Basic auth) waits before its next
//! attempt is looked at, twice as long after each failure, up to
//! [`MAX_DELAY`]. A success from the address, or [`FORGET_AFTER`] without
//! a failure, clears it. Guessing a password from one address then takes
//! seconds per guess instead of microseconds, while a worker whose
//! password was fixed connects at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wait after the first failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest wait.
pub const MAX_DELAY: Duration = Duration::from_secs(8);
/// How long an address's failures are remembered without a new one.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How many addresses are remembered at most; past it, the ones whose last
/// failure is oldest are forgotten first.
const MAX_ADDRESSES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The failures of each address, for one listener or several.
#[derive(Debug, Default)]
pub struct Throttle {
    seen: Mutex<HashMap<IpAddr, Failures>>,
}

impl Throttle {
    /// How long an attempt from `ip` waits before it is looked at.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let seen = crate::sync::lock(&self.seen);
        match seen.get(&ip) {
            Some(f) if f.last.elapsed() < FORGET_AFTER => delay_after(f.count),
            _ => Duration::ZERO,
        }
    }

    /// Waits as long as [`Throttle::delay`] says.
    pub async fn wait(&self, ip: IpAddr) {
        let d = self.delay(ip);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Notes wrong credentials from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut seen = crate::sync::lock(&self.seen);
        if seen.len() >= MAX_ADDRESSES && !seen.contains_key(&ip) {
            seen.retain(|_, f| f.last.elapsed() < FORGET_AFTER);
            if seen.len() >= MAX_ADDRESSES {
                if let Some(oldest) = seen.iter().min_by_key(|(_, f)| f.last).map(|(ip, _)| *ip) {
                    seen.remove(&oldest);
                }
            }
        }
        let f = seen.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if f.last.elapsed() >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
    }

    /// Notes good credentials from `ip`: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        crate::sync::lock(&self.seen).remove(&ip);
    }
}

/// The wait after `count` failures in a row.
fn delay_after(count: u32) -> Duration {
    if count == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (count - 1).min(16);
    FIRST_DELAY.saturating_mul(factor).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn the_wait_doubles_per_failure_up_to_the_cap_and_a_success_clears_it() {
        let t = Throttle::default();
        let a = ip("192.0.2.7");
        assert_eq!(t.delay(a), Duration::ZERO);
        let mut waits = vec![];
        for _ in 0..8 {
            t.failed(a);
            waits.push(t.delay(a).as_millis());
        }
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // Another address is not slowed by it.
        assert_eq!(t.delay(ip("192.0.2.8")), Duration::ZERO);
        t.succeeded(a);
        assert_eq!(t.delay(a), Duration::ZERO);
    }

    #[test]
    fn many_addresses_are_remembered_within_a_bound() {
        let t = Throttle::default();
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            t.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(crate::sync::lock(&t.seen).len() <= MAX_ADDRESSES);
        // The newest is remembered.
        let newest = IpAddr::from((MAX_ADDRESSES as u32 + 99).to_be_bytes());
        assert_eq!(t.delay(newest), FIRST_DELAY);
    }
}

/// Connections still in their handshake, per address and in all. Past
/// `per_address` from one address, or `total` in all, a new connection is
/// closed at once: half-open connections (a client that connects and says
/// nothing) cannot use up the master's file descriptors, nor one address
/// crowd out the others.
#[derive(Debug)]
pub struct Handshakes {
    open: Mutex<HashMap<IpAddr, usize>>,
    per_address: usize,
    total: usize,
}

/// One admitted connection's place until its handshake ends (dropped).
#[derive(Debug)]
pub struct Admitted {
    of: std::sync::Arc<Handshakes>,
    ip: IpAddr,
}

impl Handshakes {
    pub fn new(per_address: usize, total: usize) -> Handshakes {
        Handshakes {
            open: Mutex::default(),
            per_address,
            total,
        }
    }

    /// A place for a new connection from `ip`, if there is one.
    pub fn admit(self: &std::sync::Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut open = crate::sync::lock(&self.open);
        let all: usize = open.values().sum();
        let mine = open.get(&ip).copied().unwrap_or(0);
        if all >= self.total || mine >= self.per_address {
            return None;
        }
        open.insert(ip, mine + 1);
        Some(Admitted {
            of: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = crate::sync::lock(&self.of.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Connections a listener closed at once for want of a place, counted and
/// said once in a while rather than once per connection of a flood.
#[derive(Debug, Default)]
pub struct Refusals {
    since_said: u64,
    said: Option<std::time::Instant>,
}

impl Refusals {
    /// How often the count is said.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Counts one; returns how many to say now, when it is time.
    pub fn note(&mut self) -> Option<u64> {
        self.since_said += 1;
        if self.said.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return None;
        }
        self.said = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.since_said))
    }
}

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn refusals_are_said_at_the_first_then_counted_until_the_next_saying() {
        let mut r = Refusals::default();
        assert_eq!(r.note(), Some(1));
        assert_eq!((r.note(), r.note()), (None, None));
        r.said = std::time::Instant::now().checked_sub(Refusals::EVERY);
        assert_eq!(r.note(), Some(3));
    }

    #[test]
    fn places_are_bounded_per_address_and_in_all_and_come_back_when_dropped() {
        let h = Arc::new(Handshakes::new(2, 3));
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let a1 = h.admit(a).expect("a1");
        let _a2 = h.admit(a).expect("a2");
        assert!(h.admit(a).is_none(), "two per address");
        let _b1 = h.admit(b).expect("b1");
        assert!(h.admit(b).is_none(), "three in all");
        drop(a1);
        assert!(h.admit(b).is_some(), "a place came back");
    }
}

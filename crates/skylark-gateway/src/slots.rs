//! Connections per IP address, so one address cannot hold all the server's
//! sockets (and the memory behind them) with connections that never even
//! authenticate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug)]
pub(crate) struct IpSlots {
    open: Mutex<HashMap<IpAddr, u32>>,
    max: u32,
}

/// One open connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct IpSlot {
    slots: Arc<IpSlots>,
    ip: IpAddr,
}

impl IpSlots {
    pub(crate) fn new(max: u32) -> Arc<IpSlots> {
        Arc::new(IpSlots { open: Mutex::new(HashMap::new()), max })
    }

    /// A place for one more connection from `ip`, if it has fewer than the maximum.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            metrics::counter!("skylark_connections_refused_total", "reason" => "per_ip").increment(1);
            return None;
        }
        *count += 1;
        Some(IpSlot { slots: self.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_address_and_freed() {
        let slots = IpSlots::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = slots.acquire(a).unwrap();
        let _second = slots.acquire(a).unwrap();
        assert!(slots.acquire(a).is_none());
        assert!(slots.acquire(b).is_some(), "other addresses are unaffected");
        drop(first);
        assert!(slots.acquire(a).is_some(), "a closed connection frees its place");
    }
}

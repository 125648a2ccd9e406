//! The in-process exchange: ranks are threads of this process (one per GPU with `--devices`; several CPU
//! workers in tests). Each `all_gather` is a round: every rank leaves its bytes, the last to arrive publishes
//! them all and wakes the others.

use super::{Exchange, PeerStopped};
use anyhow::{bail, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Round {
    /// Rounds completed so far.
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's values (kept until every rank has read them: a rank cannot finish the next
    /// round without the slow reader).
    published: Arc<Vec<Vec<u8>>>,
    /// Set once a rank stops with an error.
    failed: Option<String>,
}

struct Shared {
    round: Mutex<Round>,
    turned: Condvar,
    timeout: Duration,
}

/// One rank's end of an in-process exchange.
pub struct LocalExchange {
    rank: usize,
    shared: Arc<Shared>,
}

/// The exchanges of `world` ranks (hand one to each thread). A rank waits at most `timeout` for the others.
pub fn group(world: usize, timeout: Duration) -> Vec<LocalExchange> {
    let shared = Arc::new(Shared {
        round: Mutex::new(Round { generation: 0, slots: vec![None; world], published: Arc::new(vec![]), failed: None }),
        turned: Condvar::new(),
        timeout,
    });
    (0..world).map(|rank| LocalExchange { rank, shared: shared.clone() }).collect()
}

impl Exchange for LocalExchange {
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let sh = &*self.shared;
        let mut r = sh.round.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &r.failed {
            return Err(PeerStopped(why.clone()).into());
        }
        let generation = r.generation;
        r.slots[self.rank] = Some(mine);
        if r.slots.iter().all(Option::is_some) {
            let world = r.slots.len();
            let values = std::mem::replace(&mut r.slots, vec![None; world]);
            r.published = Arc::new(values.into_iter().map(|v| v.unwrap_or_default()).collect());
            r.generation += 1;
            sh.turned.notify_all();
            return Ok((*r.published).clone());
        }
        let deadline = Instant::now() + sh.timeout;
        while r.generation == generation {
            if let Some(why) = &r.failed {
                return Err(PeerStopped(why.clone()).into());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> =
                    r.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i.to_string()).collect();
                bail!(
                    "rank {}: rank(s) {} did not reach the exchange within {:.0} s (--dist-timeout)",
                    self.rank,
                    missing.join(", "),
                    sh.timeout.as_secs_f64()
                );
            }
            r = sh.turned.wait_timeout(r, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok((*r.published).clone())
    }

    fn abort(&self, why: &str) {
        let mut r = self.shared.round.lock().unwrap_or_else(|p| p.into_inner());
        if r.failed.is_none() {
            r.failed = Some(format!("rank {} stopped: {why}", self.rank));
        }
        self.shared.turned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_hand_everyone_every_value_in_rank_order() {
        let xs = group(3, Duration::from_secs(10));
        let out: Vec<Vec<Vec<Vec<u8>>>> = std::thread::scope(|s| {
            let hs: Vec<_> = xs
                .into_iter()
                .enumerate()
                .map(|(r, x)| s.spawn(move || (0..50u8).map(|i| x.all_gather(vec![r as u8, i]).unwrap()).collect()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_rank in &out {
            for (i, round) in per_rank.iter().enumerate() {
                assert_eq!(round, &vec![vec![0, i as u8], vec![1, i as u8], vec![2, i as u8]]);
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let xs = group(2, Duration::from_millis(200));
        let e = xs[0].all_gather(vec![1]).unwrap_err().to_string();
        assert!(e.contains("rank(s) 1 did not reach"), "{e}");
    }
}

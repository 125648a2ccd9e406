//! The exchange between processes: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects to
//! it (a star). Joining checks each rank's number, the world size and the binary's version; an `all_gather`
//! sends each rank's bytes to rank 0, which answers every rank with all of them. A rank that stops closes its
//! connection (or reports its error), so the others end at once; one that hangs ends them at the timeout.

use super::{Exchange, PeerStopped, ProcessRank};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A frame's kind: values, or a rank's reason for stopping.
const DATA: u8 = 0;
const STOPPED: u8 = 1;

/// What a joining rank says of itself.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    rank: usize,
    world: usize,
    version: String,
}

fn version() -> String {
    format!("billion {}", env!("CARGO_PKG_VERSION"))
}

enum Links {
    /// Rank 0: a connection to every other rank, by rank (index 0 unused).
    Root(Vec<Option<TcpStream>>),
    Member(TcpStream),
}

/// One process's end of the exchange.
pub struct TcpExchange {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

fn write_frame(s: &mut TcpStream, kind: u8, bytes: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(bytes)?;
    s.flush()
}

/// A frame from rank `peer`, with errors that say what happened to it.
fn read_frame(s: &mut TcpStream, me: usize, peer: usize, timeout: Duration) -> Result<(u8, Vec<u8>)> {
    let explain = |e: std::io::Error| -> anyhow::Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow::anyhow!(
                "rank {me}: no answer from rank {peer} within {:.0} s (--dist-timeout)",
                timeout.as_secs_f64()
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                PeerStopped(format!("rank {peer} closed its connection (it stopped)")).into()
            }
            _ => anyhow::anyhow!("rank {me}: reading from rank {peer}: {e}"),
        }
    };
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(explain)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
    if len > 1 << 34 {
        bail!("rank {me}: rank {peer} sent a frame of {len} bytes (not a billion rank?)");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(explain)?;
    Ok((head[0], body))
}

fn encode_all(values: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (values.len() as u64).to_le_bytes().to_vec();
    for v in values {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8]> {
        let part = bytes.get(at..at + n).context("a truncated exchange frame")?;
        at += n;
        Ok(part)
    };
    let count = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        out.push(take(len)?.to_vec());
    }
    Ok(out)
}

impl TcpExchange {
    /// Join the run: rank 0 waits (up to `timeout`) for every other rank to connect; the others connect to it,
    /// retrying until it listens.
    pub fn join(me: &ProcessRank, timeout: Duration) -> Result<Self> {
        let links = if me.rank == 0 { Self::gather_members(me, timeout)? } else { Self::connect_to_root(me, timeout)? };
        Ok(Self { rank: me.rank, world: me.world, timeout, links: Mutex::new(links) })
    }

    fn gather_members(me: &ProcessRank, timeout: Duration) -> Result<Links> {
        let port = me.master.rsplit(':').next().unwrap_or_default();
        let listener = TcpListener::bind(format!("0.0.0.0:{port}"))
            .or_else(|_| TcpListener::bind(&me.master))
            .with_context(|| format!("rank 0: cannot listen on port {port} (MASTER_PORT)"))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut members: Vec<Option<TcpStream>> = (0..me.world).map(|_| None).collect();
        while members.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                    let (_, hello) = read_frame(&mut s, 0, usize::MAX, timeout)
                        .with_context(|| format!("rank 0: a rank connecting from {from} sent no greeting"))?;
                    let hello: Hello = serde_json::from_slice(&hello)
                        .with_context(|| format!("rank 0: {from} is not a rank of this run"))?;
                    let problem = if hello.version != version() {
                        Some(format!("rank {} runs {}, rank 0 runs {}", hello.rank, hello.version, version()))
                    } else if hello.world != me.world {
                        Some(format!(
                            "rank {} has WORLD_SIZE={}, rank 0 has WORLD_SIZE={}",
                            hello.rank, hello.world, me.world
                        ))
                    } else if hello.rank == 0 || hello.rank >= me.world {
                        Some(format!("a second rank 0 or a rank out of range ({}) joined", hello.rank))
                    } else if members[hello.rank].is_some() {
                        Some(format!("rank {} joined twice", hello.rank))
                    } else {
                        None
                    };
                    if let Some(p) = problem {
                        let _ = write_frame(&mut s, STOPPED, p.as_bytes());
                        for m in members.iter_mut().flatten() {
                            let _ = write_frame(m, STOPPED, p.as_bytes());
                        }
                        bail!("rank 0: {p}");
                    }
                    members[hello.rank] = Some(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = members
                            .iter()
                            .enumerate()
                            .skip(1)
                            .filter(|(_, m)| m.is_none())
                            .map(|(r, _)| r.to_string())
                            .collect();
                        let why = format!(
                            "rank(s) {} did not join within {:.0} s (--dist-timeout); WORLD_SIZE={}",
                            missing.join(", "),
                            timeout.as_secs_f64(),
                            me.world
                        );
                        for m in members.iter_mut().flatten() {
                            let _ = write_frame(m, STOPPED, why.as_bytes());
                        }
                        bail!("rank 0: {why}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("rank 0: accepting a rank's connection"),
            }
        }
        for m in members.iter_mut().flatten() {
            write_frame(m, DATA, b"joined").context("rank 0: answering a rank that joined")?;
        }
        Ok(Links::Root(members))
    }

    fn connect_to_root(me: &ProcessRank, timeout: Duration) -> Result<Links> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<_> = me
            .master
            .to_socket_addrs()
            .with_context(|| format!("rank {}: MASTER_ADDR:MASTER_PORT {} is not an address", me.rank, me.master))?
            .collect();
        let mut s = loop {
            if let Some(s) = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok()) {
                break s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "rank {}: rank 0 is not listening at {} after {:.0} s (--dist-timeout)",
                    me.rank,
                    me.master,
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let hello = Hello { rank: me.rank, world: me.world, version: version() };
        write_frame(&mut s, DATA, &serde_json::to_vec(&hello)?).context("greeting rank 0")?;
        match read_frame(&mut s, me.rank, 0, timeout)? {
            (DATA, _) => Ok(Links::Member(s)),
            (_, why) => Err(PeerStopped(format!("rank 0 refused the run: {}", String::from_utf8_lossy(&why))).into()),
        }
    }
}

impl Exchange for TcpExchange {
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *links {
            Links::Member(s) => {
                write_frame(s, DATA, &mine).map_err(|_| {
                    PeerStopped(format!("rank {}: rank 0 closed its connection (it stopped)", self.rank))
                })?;
                match read_frame(s, self.rank, 0, self.timeout)? {
                    (DATA, all) => decode_all(&all),
                    (_, why) => Err(PeerStopped(String::from_utf8_lossy(&why).into_owned()).into()),
                }
            }
            Links::Root(members) => {
                let mut all = vec![mine];
                let mut failure: Option<anyhow::Error> = None;
                for (r, m) in members.iter_mut().enumerate().skip(1) {
                    let Some(s) = m else { continue };
                    match read_frame(s, 0, r, self.timeout) {
                        Ok((DATA, v)) => all.push(v),
                        Ok((_, why)) => {
                            failure = Some(PeerStopped(String::from_utf8_lossy(&why).into_owned()).into());
                            break;
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failure {
                    let why = format!("{e:#}");
                    for s in members.iter_mut().flatten() {
                        let _ = write_frame(s, STOPPED, why.as_bytes());
                    }
                    return Err(e);
                }
                let frame = encode_all(&all);
                for (r, m) in members.iter_mut().enumerate().skip(1) {
                    if let Some(s) = m {
                        write_frame(s, DATA, &frame)
                            .map_err(|_| PeerStopped(format!("rank {r} closed its connection (it stopped)")))?;
                    }
                }
                debug_assert_eq!(all.len(), self.world);
                Ok(all)
            }
        }
    }

    fn abort(&self, why: &str) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let why = format!("rank {} stopped: {why}", self.rank);
        match &mut *links {
            Links::Member(s) => {
                let _ = write_frame(s, STOPPED, why.as_bytes());
            }
            Links::Root(members) => {
                for s in members.iter_mut().flatten() {
                    let _ = write_frame(s, STOPPED, why.as_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn rank(rank: usize, world: usize, port: u16) -> ProcessRank {
        ProcessRank { rank, world, local_rank: rank, master: format!("127.0.0.1:{port}") }
    }

    #[test]
    fn ranks_join_and_exchange_in_rank_order() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let out: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let x = TcpExchange::join(&rank(r, 3, port), t).unwrap();
                        x.all_gather(vec![]).unwrap();
                        x.all_gather(vec![r as u8; r + 1]).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in out {
            assert_eq!(got, vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
        }
    }

    #[test]
    fn a_world_size_mismatch_stops_both_sides() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(move || TcpExchange::join(&rank(0, 2, port), t).err().map(|e| e.to_string()));
            let b = s.spawn(move || TcpExchange::join(&rank(1, 3, port), t).err().map(|e| e.to_string()));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.unwrap().contains("WORLD_SIZE=3"));
        assert!(b.unwrap().contains("WORLD_SIZE=3"));
    }

    #[test]
    fn a_rank_that_never_joins_ends_rank_0_at_the_timeout() {
        let port = free_port();
        let e = TcpExchange::join(&rank(0, 2, port), Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("rank(s) 1 did not join"), "{e}");
    }

    #[test]
    fn a_stopped_rank_is_reported_to_the_others() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let e = std::thread::scope(|s| {
            let a = s.spawn(move || {
                let x = TcpExchange::join(&rank(0, 2, port), t).unwrap();
                x.all_gather(vec![]).unwrap_err().to_string()
            });
            s.spawn(move || {
                let x = TcpExchange::join(&rank(1, 2, port), t).unwrap();
                x.abort("its data file is unreadable");
            });
            a.join().unwrap()
        });
        assert!(e.contains("its data file is unreadable"), "{e}");
    }
}

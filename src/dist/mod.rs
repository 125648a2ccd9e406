//! Data-parallel runs: several ranks, each with its own model replica on its own device, doing their share of
//! one job and exchanging what they found.
//!
//! A [`Group`] is one rank's view of the run: its rank and the world size, a byte exchange for results and
//! small values (every rank's bytes, in rank order, on every rank), and — on CUDA, when built with `nccl` —
//! NCCL for summing gradients on the devices. The exchange is in-process ([`local`]: one worker thread per GPU of
//! this host) or over TCP ([`tcp`]: one process per rank, launched as torchrun launches them, on one host or
//! several). Both behave the same, so the sharding and reduction logic of the tasks is tested on the CPU with
//! worker threads or local processes.
//!
//! [`Launch`] reads how this run was started (`--devices`, or torchrun's `RANK`/`WORLD_SIZE`/... variables) and
//! [`run`] starts its ranks.

pub mod local;
#[cfg(feature = "nccl")]
mod nccl;
pub mod shard;
pub mod tcp;

use crate::load::DeviceSpec;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// How the ranks exchange bytes: `all_gather` hands every rank's bytes, in rank order, to every rank.
pub trait Exchange: Send {
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>>;
    /// Tell the other ranks that this one stopped, and why (best effort: they end with this reason instead of
    /// waiting for their timeout).
    fn abort(&self, why: &str);
}

/// One rank of a run.
pub struct Group {
    rank: usize,
    world: usize,
    exchange: Option<Box<dyn Exchange>>,
    #[cfg(feature = "nccl")]
    devices: Option<nccl::DeviceReduce>,
}

impl Group {
    /// A run of one: every collective returns this rank's own value.
    pub fn single() -> Self {
        Self::new(0, 1, None)
    }

    fn new(rank: usize, world: usize, exchange: Option<Box<dyn Exchange>>) -> Self {
        Self {
            rank,
            world,
            exchange,
            #[cfg(feature = "nccl")]
            devices: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: the one that writes files and prints results.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        match &self.exchange {
            None => Ok(vec![mine]),
            Some(x) => {
                let all = x.all_gather(mine)?;
                if all.len() != self.world {
                    bail!("rank {}: the exchange returned {} values for {} ranks", self.rank, all.len(), self.world);
                }
                Ok(all)
            }
        }
    }

    /// Every rank's value, in rank order (serialized as JSON: f64 values come back exactly).
    pub fn all_gather_json<T: Serialize + DeserializeOwned>(&self, mine: &T) -> Result<Vec<T>> {
        self.all_gather(serde_json::to_vec(mine)?)?
            .iter()
            .enumerate()
            .map(|(r, b)| serde_json::from_slice(b).with_context(|| format!("rank {r} sent an unreadable value")))
            .collect()
    }

    /// The element-wise sum of every rank's `values`, added in rank order (the same result on every rank).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(values.to_vec());
        }
        let all: Vec<Vec<f64>> = self.all_gather_json(&values.to_vec())?;
        let mut out = vec![0.0; values.len()];
        for (r, v) in all.iter().enumerate() {
            if v.len() != out.len() {
                bail!("rank {r} sent {} values to sum, rank {} has {}", v.len(), self.rank, out.len());
            }
            out.iter_mut().zip(v).for_each(|(o, x)| *o += x);
        }
        Ok(out)
    }

    /// Whether `flag` is set on any rank (the same answer on every rank).
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.sum_f64(&[flag as u8 as f64])?[0] > 0.0)
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        self.all_gather(vec![]).map(|_| ())
    }

    /// Check that every rank has the same `value` of `what` (model, options, binary), naming the first rank that
    /// differs from rank 0.
    pub fn agree(&self, what: &str, value: &str) -> Result<()> {
        let all: Vec<String> = self.all_gather_json(&value.to_string())?;
        if let Some((r, other)) = all.iter().enumerate().find(|(_, v)| *v != &all[0]) {
            bail!("the ranks disagree on the {what}: rank 0 has {}, rank {r} has {}", all[0], other);
        }
        Ok(())
    }

    /// Sum `t` over the ranks (every rank gets the sum, in `t`'s dtype and on its device). On CUDA with NCCL
    /// connected ([`Group::connect_devices`]) the sum runs on the devices; otherwise it goes through the exchange
    /// as f32, added in rank order.
    pub fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        #[cfg(feature = "nccl")]
        if let (Some(d), true) = (&self.devices, t.device().is_cuda()) {
            return d.sum(t);
        }
        let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(bytes)?;
        let mut sum = vec![0f32; values.len()];
        for (r, b) in all.iter().enumerate() {
            if b.len() != 4 * sum.len() {
                bail!("rank {r} sent {} values to sum, rank {} has {}", b.len() / 4, self.rank, sum.len());
            }
            for (s, c) in sum.iter_mut().zip(b.chunks_exact(4)) {
                *s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }

    /// Connect the ranks' CUDA devices through NCCL (rank 0 makes the NCCL id and hands it out through the
    /// exchange). Nothing to do for a run of one, a CPU device, a binary built without `nccl`, or with
    /// `BILLION_DIST_NCCL=0` (sums then go through the exchange: slower, but ranks may then share a GPU).
    pub fn connect_devices(&mut self, device: &Device) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let nccl_off = std::env::var("BILLION_DIST_NCCL").is_ok_and(|v| v == "0");
        let nccl = cfg!(feature = "nccl") && device.is_cuda() && !nccl_off;
        // Every rank must take the same way, or the NCCL id exchange would pair with another collective.
        self.agree(
            "way gradients are summed (NCCL, or the host: BILLION_DIST_NCCL=0, CPU or no `nccl` build)",
            if nccl { "NCCL" } else { "host" },
        )?;
        #[cfg(feature = "nccl")]
        if nccl {
            self.devices = Some(nccl::DeviceReduce::connect(self, device)?);
        }
        Ok(())
    }

    /// Tell the other ranks this one stopped with `error`.
    pub fn abort(&self, error: &anyhow::Error) {
        if let Some(x) = &self.exchange {
            x.abort(&format!("{error:#}"));
        }
    }
}

/// What identifies a loaded model across ranks without reading all of its weights: format, quantization, dtype,
/// config, and each weight file's name, size and the hash of its first and last 64 KiB. Random weights have no
/// files: their shapes are compared.
pub fn model_fingerprint(loaded: &crate::load::LoadedModel) -> String {
    use sha2::{Digest, Sha256};
    use std::io::{Seek, SeekFrom};
    let mut h = Sha256::new();
    h.update(format!("{:?}", loaded.config()).as_bytes());
    let mut files: Vec<std::path::PathBuf> = if loaded.source.is_dir() {
        std::fs::read_dir(&loaded.source)
            .map(|d| {
                d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect()
            })
            .unwrap_or_default()
    } else if loaded.format == "gguf" || loaded.source.extension().is_some_and(|x| x == "gguf") {
        vec![loaded.source.clone()]
    } else {
        vec![]
    };
    files.sort();
    for f in &files {
        let Ok(mut file) = std::fs::File::open(f) else { continue };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        h.update(format!("{}:{len}", f.file_name().unwrap_or_default().to_string_lossy()).as_bytes());
        let mut buf = vec![0u8; 64 << 10];
        for at in [0, len.saturating_sub(buf.len() as u64)] {
            if file.seek(SeekFrom::Start(at)).is_ok() {
                let n = std::io::Read::read(&mut file, &mut buf).unwrap_or(0);
                h.update(&buf[..n]);
            }
        }
    }
    let digest: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "{} {} {} {:?} ({digest})",
        loaded.source.file_name().unwrap_or_default().to_string_lossy(),
        loaded.format,
        loaded.quantization,
        loaded.model.dtype()
    )
}

/// Which devices a run's workers use, from `--devices`: `all`, or a comma-separated list of `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    All,
    Listed(Vec<usize>),
}

impl std::str::FromStr for DeviceList {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(DeviceList::All);
        }
        let mut ordinals = vec![];
        for part in s.split(',').map(str::trim) {
            match part.parse::<DeviceSpec>()? {
                DeviceSpec::Cuda(n) => {
                    if ordinals.contains(&n) {
                        return Err(format!("cuda:{n} is named twice"));
                    }
                    ordinals.push(n);
                }
                other => {
                    return Err(format!(
                        "`{other}`: --devices lists GPUs (cuda:0,cuda:1 or all); for one device use --device"
                    ))
                }
            }
        }
        if ordinals.is_empty() {
            return Err("no device given".into());
        }
        Ok(DeviceList::Listed(ordinals))
    }
}

impl DeviceList {
    /// The CUDA ordinals, each checked to exist on this host.
    pub fn ordinals(&self) -> Result<Vec<usize>> {
        let count = cuda_device_count();
        if count == 0 {
            bail!("--devices: no CUDA device is available (this binary {} CUDA)", built_with_cuda());
        }
        match self {
            DeviceList::All => Ok((0..count).collect()),
            DeviceList::Listed(l) => {
                if let Some(n) = l.iter().find(|&&n| n >= count) {
                    bail!(
                        "--devices: cuda:{n} does not exist (this host has {count} CUDA device(s): cuda:0..cuda:{})",
                        count - 1
                    );
                }
                Ok(l.clone())
            }
        }
    }
}

fn built_with_cuda() -> &'static str {
    if cfg!(feature = "cuda") {
        "was built with"
    } else {
        "was built without"
    }
}

/// CUDA devices on this host (0 without CUDA).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        if candle_core::utils::cuda_is_available() {
            return CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0);
        }
    }
    0
}

/// A rank of a run started once per rank (torchrun's variables).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessRank {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its host (picks the GPU when `--device` is not given).
    pub local_rank: usize,
    /// Where rank 0 listens: `MASTER_ADDR:MASTER_PORT`.
    pub master: String,
}

/// How this run was started.
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// One worker on `--device` (or the best device present).
    Single { device: Option<DeviceSpec> },
    /// One process, one worker thread per listed GPU.
    Threads { devices: Vec<DeviceSpec>, timeout: Duration },
    /// One process per rank, as torchrun starts them; this is one of them.
    Process { me: ProcessRank, device: Option<DeviceSpec>, timeout: Duration },
}

/// torchrun's variables read from `env` (a lookup, so tests need not set the process's environment).
pub fn process_rank_from(env: impl Fn(&str) -> Option<String>) -> Result<Option<ProcessRank>> {
    let (rank, world) = match (env("RANK"), env("WORLD_SIZE")) {
        (None, None) => return Ok(None),
        (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not: set both (as torchrun does), or neither"),
        (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not: set both (as torchrun does), or neither"),
        (Some(r), Some(w)) => (r, w),
    };
    let number = |name: &str, v: &str| -> Result<usize> {
        v.trim().parse::<usize>().with_context(|| format!("{name}={v:?}: expected a whole number"))
    };
    let rank = number("RANK", &rank)?;
    let world = number("WORLD_SIZE", &world)?;
    if world == 0 {
        bail!("WORLD_SIZE=0: expected at least 1");
    }
    if rank >= world {
        bail!("RANK={rank} with WORLD_SIZE={world}: ranks count from 0 to {}", world - 1);
    }
    let local_rank = match env("LOCAL_RANK") {
        Some(v) => number("LOCAL_RANK", &v)?,
        None => rank,
    };
    let addr = env("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = match env("MASTER_PORT") {
        Some(v) => {
            let p = number("MASTER_PORT", &v)?;
            if p == 0 || p > 65535 {
                bail!("MASTER_PORT={p}: expected a port from 1 to 65535");
            }
            p
        }
        None => 29500,
    };
    let master = if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    Ok(Some(ProcessRank { rank, world, local_rank, master }))
}

impl Launch {
    /// From `--devices`, `--device` and the environment. Errors name the flag or variable at fault.
    pub fn resolve(devices: Option<&DeviceList>, device: Option<DeviceSpec>, timeout: Duration) -> Result<Self> {
        Self::resolve_with(devices, device, timeout, |k| std::env::var(k).ok())
    }

    pub fn resolve_with(
        devices: Option<&DeviceList>,
        device: Option<DeviceSpec>,
        timeout: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let me = process_rank_from(env)?;
        match (me, devices) {
            (Some(_), Some(_)) => bail!(
                "--devices: not with RANK/WORLD_SIZE set (a run launched once per rank uses one device per process: \
                 --device, or cuda:LOCAL_RANK)"
            ),
            (Some(me), None) if me.world > 1 => Ok(Launch::Process { me, device, timeout }),
            (Some(_), None) | (None, None) => Ok(Launch::Single { device }),
            (None, Some(list)) => {
                if device.is_some() {
                    bail!("--device and --devices: give one of them");
                }
                let devices: Vec<DeviceSpec> = list.ordinals()?.into_iter().map(DeviceSpec::Cuda).collect();
                if devices.len() == 1 {
                    return Ok(Launch::Single { device: Some(devices[0]) });
                }
                Ok(Launch::Threads { devices, timeout })
            }
        }
    }

    pub fn world(&self) -> usize {
        match self {
            Launch::Single { .. } => 1,
            Launch::Threads { devices, .. } => devices.len(),
            Launch::Process { me, .. } => me.world,
        }
    }
}

/// What rank `r`'s worker does: its group and the device it runs on (`None`: the best one present).
pub type Worker<'a, T> = dyn Fn(&mut Group, Option<DeviceSpec>) -> Result<T> + Sync + 'a;

/// Run `work` on every rank of `launch` that lives in this process; returns this process's first rank's result
/// (rank 0's when the ranks are threads). A rank that fails tells the others, which end with its error.
pub fn run<T: Send>(launch: &Launch, work: &Worker<'_, T>) -> Result<T> {
    match launch {
        Launch::Single { device } => work(&mut Group::single(), *device),
        Launch::Process { me, device, timeout } => {
            let exchange = tcp::TcpExchange::join(me, *timeout)?;
            let mut group = Group::new(me.rank, me.world, Some(Box::new(exchange)));
            let device = device.or_else(|| (cuda_device_count() > 0).then_some(DeviceSpec::Cuda(me.local_rank)));
            let out = work(&mut group, device);
            if let Err(e) = &out {
                group.abort(e);
            }
            out
        }
        Launch::Threads { devices, timeout } => {
            let exchanges = local::group(devices.len(), *timeout);
            run_threads(exchanges, devices.iter().map(|d| Some(*d)).collect(), work)
        }
    }
}

/// `work` on one thread per exchange; rank 0's result, or the first error that is not only another rank's
/// report of it.
pub fn run_threads<T: Send>(
    exchanges: Vec<local::LocalExchange>,
    devices: Vec<Option<DeviceSpec>>,
    work: &Worker<'_, T>,
) -> Result<T> {
    let world = exchanges.len();
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (x, device))| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        let mut group = Group::new(rank, world, Some(Box::new(x)));
                        // A panicking rank tells the others too, instead of leaving them to their timeout.
                        let caught =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut group, device)));
                        let out = caught.unwrap_or_else(|_| Err(anyhow::anyhow!("rank {rank}'s worker panicked")));
                        if let Err(e) = &out {
                            group.abort(e);
                        }
                        out
                    })
                    .expect("spawn a rank's thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("rank {r}'s worker panicked"))))
            .collect()
    });
    let mut first_error = None;
    let mut out = None;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) if r == 0 => out = Some(v),
            Ok(_) => {}
            Err(e) => {
                // A rank's own failure explains more than the others' reports that it stopped.
                let reported = e.downcast_ref::<PeerStopped>().is_some();
                match &first_error {
                    None => first_error = Some((reported, e)),
                    Some((true, _)) if !reported => first_error = Some((reported, e)),
                    _ => {}
                }
            }
        }
    }
    match (first_error, out) {
        (Some((_, e)), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => bail!("rank 0 returned nothing"),
    }
}

/// Another rank stopped (its reason inside), so this one did too.
#[derive(Debug)]
pub struct PeerStopped(pub String);

impl std::fmt::Display for PeerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerStopped {}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        assert_eq!(process_rank_from(env(&[])).unwrap(), None);
        let me = process_rank_from(env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29511")])).unwrap();
        assert_eq!(me, Some(ProcessRank { rank: 1, world: 2, local_rank: 1, master: "127.0.0.1:29511".into() }));
        let err = |vars: &[(&str, &str)]| process_rank_from(env(vars)).unwrap_err().to_string();
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "0")]).contains("MASTER_PORT"));
    }

    #[test]
    fn device_lists_refuse_repeats_and_cpus() {
        assert_eq!("cuda:0,cuda:1".parse::<DeviceList>().unwrap(), DeviceList::Listed(vec![0, 1]));
        assert_eq!("ALL".parse::<DeviceList>().unwrap(), DeviceList::All);
        assert!("cuda:1,cuda:1".parse::<DeviceList>().unwrap_err().contains("twice"));
        assert!("cpu,cpu".parse::<DeviceList>().unwrap_err().contains("--device"));
        assert!("cuda:x".parse::<DeviceList>().is_err());
    }

    #[test]
    fn launches_refuse_mixed_flags() {
        let t = Duration::from_secs(5);
        let list = DeviceList::Listed(vec![0, 1]);
        let torchrun = env(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
        assert!(Launch::resolve_with(Some(&list), None, t, torchrun).unwrap_err().to_string().contains("--devices"));
        let none = env(&[]);
        assert!(Launch::resolve_with(Some(&list), Some(DeviceSpec::Cpu), t, none)
            .unwrap_err()
            .to_string()
            .contains("--device"));
        let one = env(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert_eq!(Launch::resolve_with(None, None, t, one).unwrap(), Launch::Single { device: None });
    }

    #[test]
    fn threads_sum_and_agree() {
        let work = |g: &mut Group, _: Option<DeviceSpec>| -> Result<(Vec<f64>, Vec<f32>)> {
            g.agree("model", "same")?;
            let s = g.sum_f64(&[g.rank() as f64, 1.0])?;
            let t = Tensor::new(&[1f32 + g.rank() as f32, 2.0], &Device::Cpu)?;
            Ok((s, g.sum_tensor(&t)?.to_vec1()?))
        };
        let (s, t) = run_threads(local::group(3, Duration::from_secs(10)), vec![None; 3], &work).unwrap();
        assert_eq!(s, vec![3.0, 3.0]);
        assert_eq!(t, vec![6.0, 6.0]);
        let disagree = |g: &mut Group, _: Option<DeviceSpec>| g.agree("model", &format!("m{}", g.rank().min(1)));
        let e = run_threads(local::group(2, Duration::from_secs(10)), vec![None; 2], &disagree).unwrap_err();
        assert!(e.to_string().contains("rank 1 has m1"), "{e}");
    }

    #[test]
    fn a_failing_rank_ends_the_others_with_its_error() {
        let work = |g: &mut Group, _: Option<DeviceSpec>| -> Result<()> {
            if g.rank() == 1 {
                bail!("rank 1's model file is missing");
            }
            g.barrier()
        };
        let started = std::time::Instant::now();
        let e = run_threads(local::group(2, Duration::from_secs(60)), vec![None; 2], &work).unwrap_err();
        assert!(e.to_string().contains("model file is missing"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "no wait for the timeout");
    }
}

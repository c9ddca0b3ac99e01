//! Reading the server's CPU time and memory from /proc, and our own rusage.
//!
//! A server may be a process tree (Dovecot forks a `pop3` process per logged-in
//! client and reaps it when it exits), so CPU time is the sum over the live tree
//! of own + reaped-children time, and memory is summed over the live tree.

use std::collections::HashMap;
use std::fs;

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime+stime+cutime+cstime in ticks) from /proc/PID/stat.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' : state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    let ppid = f.get(1)?.parse().ok()?;
    let mut t = 0u64;
    for k in 11..=14 {
        t += f.get(k)?.parse::<i64>().ok()?.max(0) as u64;
    }
    Some((ppid, t))
}

/// The pid and every live descendant.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat_of(pid) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < 1_000_000 {
        if let Some(c) = children.get(&out[i]) {
            out.extend_from_slice(c);
        }
        i += 1;
    }
    out
}

/// CPU seconds used by the tree so far (including reaped children).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree(root)
        .into_iter()
        .filter_map(stat_of)
        .map(|(_, t)| t)
        .sum();
    ticks as f64 / clk_tck()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let path = if key == "Pss:" {
        format!("/proc/{pid}/smaps_rollup")
    } else {
        format!("/proc/{pid}/status")
    };
    let Ok(s) = fs::read_to_string(path) else {
        return 0;
    };
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    pub processes: usize,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

pub fn tree_mem(root: u32) -> Mem {
    let pids = tree(root);
    let mut m = Mem {
        processes: pids.len(),
        ..Mem::default()
    };
    for p in pids {
        m.rss_kib += status_kib(p, "VmRSS:");
        m.pss_kib += status_kib(p, "Pss:");
    }
    m
}

/// (user, system) CPU seconds of this process.
pub fn self_cpu() -> (f64, f64) {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Raise the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

/// Busy seconds of one CPU so far (everything but idle and iowait), from /proc/stat.
pub fn core_busy_seconds(core: usize) -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{core}");
    let line = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let busy: u64 = v.iter().take(8).sum::<u64>() - v[3] - v[4];
    Some(busy as f64 / clk_tck())
}

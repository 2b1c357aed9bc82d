//! Reading what processes cost, from /proc: CPU time (the scheduler's
//! nanosecond accounting, summed over every thread), memory, and how busy
//! the whole machine was.

use std::time::Duration;

/// CPU time a process has used so far, all threads, from
/// `/proc/<pid>/task/*/schedstat`. (The tick-sampled utime/stime in
/// `/proc/<pid>/stat` is biased when work is driven by timers, as it is at
/// a fixed request rate.)
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Sum of [`cpu_time`] over several processes.
pub fn cpu_time_of(pids: &[u32]) -> Duration {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

/// `(VmRSS, VmHWM)` of a process in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Direct children of a process (nginx's workers, say).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_string();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Busy CPU time so far, from /proc/stat: of one CPU (`Some(n)`, the
/// `cpuN` line) or of the whole machine. Counts user, nice, system and
/// steal; interrupt time is left out because, depending on the kernel's
/// accounting, it may already be inside the processes' own run time.
pub fn busy(cpu: Option<usize>) -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = match cpu {
        Some(n) => format!("cpu{n} "),
        None => "cpu ".to_string(),
    };
    let Some(line) = stat.lines().find(|l| l.starts_with(&prefix)) else {
        return Duration::ZERO;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 7].iter().filter_map(|i| v.get(*i)).sum();
    Duration::from_secs_f64(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Whether a command is on PATH.
pub fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A free loopback port (bound, then released). Only for peers that
/// cannot report a port-0 address themselves.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {}
        assert!(cpu_time(me) >= Duration::from_millis(10));
        assert!(memory_kib(me).0 > 0);
        assert!(busy(None) > Duration::ZERO);
        assert!(have("sh"));
    }
}

//! The agent's container stats as containerd's cgroup v2 metrics (what CRI and
//! `crictl stats` decode).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use spry_proto::agent::ContainerStats;

/// The type URL containerd's typeurl registry knows cgroup v2 metrics by.
const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_metrics(stats: &ContainerStats) -> Metrics {
    let mut metrics = Metrics::new();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = stats.cpu_usage_nanos / 1000;
    cpu.user_usec = stats.cpu_user_nanos / 1000;
    cpu.system_usec = stats.cpu_system_nanos / 1000;
    metrics.cpu = Some(cpu).into();
    let mut memory = MemoryStat::new();
    memory.usage = stats.memory_usage_bytes;
    // cgroup v2's "max" reads as u64::MAX through containerd's cgroups library, and CRI
    // reports availableBytes 0 for any limit above 2^62; a 0 here would make it
    // 0 - working set, about 2^64.
    memory.usage_limit = match stats.memory_limit_bytes {
        0 => u64::MAX,
        limit => limit,
    };
    // CRI's rssBytes, pageFaults and majorPageFaults.
    memory.anon = stats.memory_anon_bytes;
    memory.pgfault = stats.page_faults;
    memory.pgmajfault = stats.major_page_faults;
    // CRI computes the working set as usage - inactive_file.
    memory.inactive_file = stats
        .memory_usage_bytes
        .saturating_sub(stats.memory_working_set_bytes);
    metrics.memory = Some(memory).into();
    let mut pids = PidsStat::new();
    pids.current = stats.pids_current;
    pids.limit = stats.pids_limit;
    metrics.pids = Some(pids).into();
    let mut events = MemoryEvents::new();
    events.oom_kill = stats.oom_kills;
    metrics.memory_events = Some(events).into();
    metrics
}

pub fn to_any(stats: &ContainerStats) -> Any {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.to_string();
    any.value = to_metrics(stats)
        .write_to_bytes()
        .expect("metrics always encode");
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_units_and_working_set() {
        let stats = ContainerStats {
            cpu_usage_nanos: 5_000_000,
            memory_usage_bytes: 100,
            memory_working_set_bytes: 60,
            memory_limit_bytes: 1000,
            pids_current: 3,
            ..Default::default()
        };
        let any = to_any(&stats);
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 5000);
        assert_eq!(m.memory.usage - m.memory.inactive_file, 60);
        assert_eq!(m.memory.usage_limit, 1000);
        assert_eq!(m.pids.current, 3);
    }

    #[test]
    fn no_limit_reads_as_cgroup_max_and_rss_and_faults_pass_through() {
        let stats = ContainerStats {
            memory_usage_bytes: 100,
            memory_working_set_bytes: 60,
            memory_anon_bytes: 40,
            page_faults: 9,
            major_page_faults: 1,
            ..Default::default()
        };
        let m = to_metrics(&stats);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(
            (m.memory.anon, m.memory.pgfault, m.memory.pgmajfault),
            (40, 9, 1)
        );
    }
}

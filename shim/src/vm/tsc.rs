//! The host TSC frequency, which the microvm guest needs on its command line
//! (`tsc_early_khz`): it has no timer to calibrate against and hangs without.

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::sys;

const SYSFS_TSC_KHZ: &str = "/sys/devices/system/cpu/cpu0/tsc_freq_khz";
const CALIBRATION_WINDOW: Duration = Duration::from_millis(50);

/// The host TSC frequency in kHz, measured once per process.
///
/// Uses the kernel's value when it exports one, else counts TSC ticks over
/// 50 ms of the monotonic clock. Under TCG the guest reads the host TSC
/// directly, and under KVM the guest TSC runs at the host rate by default.
pub fn host_tsc_khz() -> Result<u64, io::Error> {
    static KHZ: OnceLock<u64> = OnceLock::new();
    if let Some(khz) = KHZ.get() {
        return Ok(*khz);
    }
    let khz = match std::fs::read_to_string(SYSFS_TSC_KHZ) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{SYSFS_TSC_KHZ} is not a number"),
            )
        })?,
        Err(_) => calibrate(),
    };
    if khz == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the TSC does not advance",
        ));
    }
    Ok(*KHZ.get_or_init(|| khz))
}

/// A (clock, tsc) pair read as close together as we can: of a few tries, the
/// one where reading the clock took the least TSC ticks.
fn paired_sample() -> (Instant, u64) {
    (0..5)
        .map(|_| {
            let before = sys::rdtsc();
            let now = Instant::now();
            let after = sys::rdtsc();
            (after - before, now, before / 2 + after / 2)
        })
        .min_by_key(|(spread, _, _)| *spread)
        .map(|(_, now, tsc)| (now, tsc))
        .unwrap_or_else(|| (Instant::now(), sys::rdtsc()))
}

fn calibrate() -> u64 {
    let (start, start_tsc) = paired_sample();
    std::thread::sleep(CALIBRATION_WINDOW);
    let (end, end_tsc) = paired_sample();
    let micros = end.duration_since(start).as_micros().max(1) as u64;
    (end_tsc.saturating_sub(start_tsc)) * 1000 / micros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_is_plausible_and_stable() {
        let first = calibrate();
        let second = calibrate();
        assert!((100_000..10_000_000).contains(&first), "{first} kHz");
        let drift = first.abs_diff(second) as f64 / first as f64;
        assert!(drift < 0.001, "{first} vs {second} kHz");
        assert!(host_tsc_khz().unwrap() > 0);
    }
}

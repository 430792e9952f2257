//! Retry-After parsing: any response headers, one `name: value` per line, give no wait or a
//! wait of at most a day.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llm_failover::policy::retry_after;

const MAX: Duration = Duration::from_secs(24 * 3600);

fuzz_target!(|data: &[u8]| {
    let headers: Vec<(String, &[u8])> = data
        .split(|&b| b == b'\n')
        .map(|line| {
            let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            (name, line.get(colon + 1..).unwrap_or_default())
        })
        .collect();
    for now in [0, 1_445_412_000, 4_102_444_800, u64::MAX] {
        let wait = retry_after::parse(headers.iter().map(|(n, v)| (n.as_str(), *v)), now);
        if let Some(wait) = wait {
            assert!(wait <= MAX, "{wait:?}");
        }
    }
});

//! What one request to the inventory feed costs at scale: building the
//! records from N IntegrationAccounts (as the cache holds them), filtering,
//! paging and rendering one page, for the REST and SCIM views. The feed
//! does this on every request (it keeps no index), so this is its latency
//! floor. See BENCHMARKS.md.
//!
//! ```sh
//! cargo bench --bench feed                      # N = 1000, 10000, 50000
//! cargo bench --bench feed -- 100000
//! ```

use std::time::{Duration, Instant};

use keysmith::{
    api::IntegrationAccount,
    feed::{page, select, View},
};
use serde_json::json;

fn account(i: usize) -> IntegrationAccount {
    let namespace = format!("team-{}", i % 50);
    let provider = ["zabbix", "awsIam", "kubernetes", "openBao"][i % 4];
    let mut account: IntegrationAccount = serde_json::from_value(json!({
        "apiVersion": "keysmith.dev/v1alpha1",
        "kind": "IntegrationAccount",
        "metadata": {
            "name": format!("integration-{i}"),
            "namespace": namespace,
            "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, i * 7919),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "connectionRef": {"name": "target"},
            "secret": {"name": format!("integration-{i}-key")},
            "owner": format!("team-{}", i % 50),
            "description": "a synthetic integration for the benchmark",
        },
        "status": {
            "account": {"provider": provider, "id": format!("id-{i}"), "name": format!("integration-{i}"), "disabled": i.is_multiple_of(10)},
            "roles": [{"role": "host.get"}, {"role": "problem.get"}],
            "lastUsedAt": if i.is_multiple_of(3) { None } else { Some(format!("2026-06-{:02}T10:00:00Z", 1 + i % 28)) },
            "conditions": [],
        },
    }))
    .expect("an IntegrationAccount");
    account.metadata.resource_version = Some("1".into());
    account
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(runs);
    let mut size = 0;
    for _ in 0..runs {
        let started = Instant::now();
        size = f();
        times.push(started.elapsed());
    }
    times.sort();
    (times[runs / 2], size)
}

fn main() {
    let sizes: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-')).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1000, 10_000, 50_000] } else { sizes };
    println!("| accounts | request | matched | page bytes | median time |");
    println!("|---|---|---|---|---|");
    for n in sizes {
        let accounts: Vec<IntegrationAccount> = (0..n).map(account).collect();
        let cases: [(&str, View, Option<&str>); 4] = [
            ("REST, no filter, first page of 100", View::Rest, None),
            (
                "REST, `status eq \"Active\" and provider eq \"zabbix\"`",
                View::Rest,
                Some(r#"status eq "Active" and provider eq "zabbix""#),
            ),
            (
                "REST, `not (lastLoginDtm pr) or lastLoginDtm lt \"2026-06-10\"`",
                View::Rest,
                Some(r#"not (lastLoginDtm pr) or lastLoginDtm lt "2026-06-10""#),
            ),
            ("SCIM, `userName sw \"team-7/\"`", View::Scim, Some(r#"userName sw "team-7/""#)),
        ];
        for (label, view, filter) in cases {
            let mut matched = 0;
            let (time, bytes) = median(9, || {
                let records = select(&accounts, view, filter).expect("the filter parses");
                matched = records.len();
                let (slice, _) = page(&records, None, 100);
                let body: Vec<serde_json::Value> = match view {
                    View::Rest => slice.iter().map(|r| r.rest()).collect(),
                    View::Scim => slice.iter().map(|r| r.scim("http://feed/scim/v2/Users")).collect(),
                };
                serde_json::to_vec(&body).map_or(0, |b| b.len())
            });
            println!("| {n} | {label} | {matched} | {bytes} | {:.1} ms |", time.as_secs_f64() * 1000.0);
        }
    }
}

//! What keysmith costs and how it scales: time to Ready, apiserver requests
//! per account, steady-state writes and provider calls, peak RSS (with and
//! without unrelated Secrets), and a rotation storm against the connection's
//! rate budget. See BENCHMARKS.md for what is measured and how to read it.
//!
//! ```sh
//! cargo bench --bench scale                               # N=100, both providers, 5 min steady window
//! cargo bench --bench scale -- --n 100,1000 --steady-secs 60
//! ```
//!
//! Every (provider, N) run gets a fresh local control plane (see
//! `keysmith::controlplane`) and the release `keysmith` binary as a separate
//! process, authenticated as the operator user so that its requests can be
//! told apart in the apiserver audit log.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use keysmith::{
    api::{AppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding},
    controlplane::{AuditRecord, ControlPlane, OPERATOR_USER},
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client, ResourceExt,
};
use serde_json::json;

const NAMESPACE: &str = "bench";
const UNRELATED_NAMESPACE: &str = "unrelated";

#[derive(Parser, Debug, Clone)]
#[command(about = "keysmith scale benchmark (run with `cargo bench --bench scale -- [flags]`)")]
struct Args {
    /// Numbers of IntegrationAccounts, comma-separated (e.g. 100,1000,5000).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    n: Vec<usize>,
    /// Providers to measure: kubernetes, noop.
    #[arg(long, value_delimiter = ',', default_value = "kubernetes,noop")]
    providers: Vec<String>,
    /// The steady-state window, in seconds.
    #[arg(long, default_value_t = 300)]
    steady_secs: u64,
    /// Unrelated 1 KiB Secrets for the RSS comparison run (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    unrelated_secrets: usize,
    /// The provider of the RSS comparison run.
    #[arg(long, default_value = "noop")]
    rss_provider: String,
    /// The connection's rateLimit.requestsPerSecond.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// The connection's rateLimit.burst.
    #[arg(long, default_value_t = 50)]
    burst: u32,
    /// Skip the rotation storm.
    #[arg(long)]
    no_storm: bool,
    /// How the storm makes every account due at once: `scheduled` (the
    /// KeyRotationPolicy gets a cron schedule for one minute, plus
    /// `--storm-jitter`) or `manual` (every account annotated
    /// keysmith.dev/rotate-now, which no jitter spreads).
    #[arg(long, default_value = "scheduled")]
    storm: String,
    /// The policy's jitter for a scheduled storm, in seconds; 0 picks the
    /// smallest that keeps the rotations within the budget:
    /// N x 6 provider calls / rate, at least 10 s.
    #[arg(long, default_value_t = 0)]
    storm_jitter: u64,
    /// Give up waiting for Ready (or for a storm to finish) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Concurrent requests the harness itself makes when creating objects.
    #[arg(long, default_value_t = 32)]
    client_concurrency: usize,
    /// Set by `cargo bench`; without it (e.g. under `cargo test --benches`) nothing runs.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Default, Clone)]
struct Requests {
    reads: usize,
    writes: usize,
    /// Writes by `verb resource[/subresource]`.
    writes_by: BTreeMap<String, usize>,
    /// Reads by `verb resource[/subresource]`.
    reads_by: BTreeMap<String, usize>,
}

impl Requests {
    fn from(records: &[AuditRecord]) -> Self {
        let mut out = Requests::default();
        for r in records.iter().filter(|r| r.user == OPERATOR_USER) {
            // A watch completes when it ends, not when it is made; it is no
            // per-account cost.
            if r.verb == "watch" {
                continue;
            }
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            };
            let key = format!("{} {resource}", r.verb);
            if r.is_write() {
                out.writes += 1;
                *out.writes_by.entry(key).or_default() += 1;
            } else {
                out.reads += 1;
                *out.reads_by.entry(key).or_default() += 1;
            }
        }
        out
    }

    fn writes_without_events(&self) -> usize {
        self.writes_by.iter().filter(|(k, _)| !k.ends_with(" events")).map(|(_, v)| v).sum()
    }
}

#[derive(Debug, Default, Clone)]
struct RunResult {
    provider: String,
    n: usize,
    unrelated: usize,
    ready: Duration,
    to_ready: Requests,
    provider_calls_to_ready: f64,
    steady_window: Duration,
    steady: Requests,
    steady_provider_calls: f64,
    /// Steady-state provider calls that only read (the drift check:
    /// observe, list roles, list keys; and the connection re-check).
    steady_provider_reads: f64,
    /// Accounts whose drift check fell into the steady window.
    steady_drift_checks: f64,
    hwm_ready_kib: u64,
    hwm_steady_kib: u64,
    hwm_storm_kib: u64,
    storm: Option<Storm>,
}

#[derive(Debug, Default, Clone)]
struct Storm {
    /// `manual`, or `scheduled, jitter Ns`.
    kind: String,
    /// From the annotation (manual) or the scheduled minute until every
    /// account had rotated and was Ready again.
    duration: Duration,
    /// Seconds after the scheduled minute at which the first, median and
    /// last new key was published (scheduled storms).
    published: Option<[f64; 3]>,
    /// The most new keys published within any 10 s (scheduled storms).
    max_published_10s: usize,
    provider_calls: f64,
    max_rate_1s: f64,
    /// The largest excess over the token bucket's bound (burst + rate × t) in
    /// any window between two samples; 0 when the budget held.
    max_excess: f64,
    requests: Requests,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.bench {
        println!("keysmith scale benchmark: run it with `cargo bench --bench scale -- [flags]` (see BENCHMARKS.md)");
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_all(args))
}

async fn run_all(args: Args) -> Result<()> {
    if !["scheduled", "manual"].contains(&args.storm.as_str()) {
        bail!("--storm {:?}: scheduled or manual", args.storm);
    }
    println!("{}", machine());
    println!("args: {args:?}\n");
    let mut results = Vec::new();
    for &n in &args.n {
        for provider in &args.providers {
            let result = run_one(&args, provider, n, 0).await.with_context(|| format!("{provider} N={n}"))?;
            print_result(&result);
            results.push(result);
        }
        if args.unrelated_secrets > 0 {
            let result = run_one(&args, &args.rss_provider, n, args.unrelated_secrets)
                .await
                .with_context(|| format!("{} N={n} with unrelated Secrets", args.rss_provider))?;
            print_result(&result);
            results.push(result);
        }
    }
    print_tables(&args, &results);
    Ok(())
}

/// The machine, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_owned();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().find(|l| l.starts_with("MemTotal")).map(|l| l.to_owned()).unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "machine: {cpus} CPUs ({model}), {}, Linux {}",
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        kernel.trim()
    )
}

/// One fresh control plane, one operator, one provider, N accounts.
async fn run_one(args: &Args, provider: &str, n: usize, unrelated: usize) -> Result<RunResult> {
    if !["kubernetes", "noop"].contains(&provider) {
        bail!("unknown provider {provider:?} (kubernetes or noop)");
    }
    eprintln!("== {provider} N={n} unrelated Secrets={unrelated}: starting a control plane");
    let cp = ControlPlane::start().await?;
    let result = measure(args, &cp, provider, n, unrelated).await;
    cp.stop();
    result
}

async fn measure(args: &Args, cp: &ControlPlane, provider: &str, n: usize, unrelated: usize) -> Result<RunResult> {
    let client = cp.client().await?;
    eprintln!("   kube-apiserver {}", client.apiserver_version().await?.git_version);
    keysmith::install::install_crds(&client, Duration::from_secs(60)).await?;
    let timeout = Duration::from_secs(args.timeout_secs);

    if unrelated > 0 {
        eprintln!("   creating {unrelated} unrelated 1 KiB Secrets");
        create_unrelated_secrets(&client, unrelated, args.client_concurrency).await?;
    }
    create_namespace(&client, NAMESPACE).await?;
    let noop = provider == "noop";
    let mut annotations = serde_json::Map::new();
    if noop {
        annotations.insert(keysmith::provider::noop::ANNOTATION.into(), "true".into());
    }
    let connection: AppConnection = serde_json::from_value(json!({
        "apiVersion": "keysmith.dev/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "bench", "namespace": NAMESPACE, "annotations": annotations},
        "spec": {
            "provider": {"kubernetes": {}},
            "serviceAccountName": "keysmith",
            "rateLimit": {"requestsPerSecond": args.rate, "burst": args.burst},
            "maxKeysPerAccount": 2,
        }
    }))?;
    // The ServiceAccount the connection acts as, with the quickstart's Role.
    let identity = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/quickstart/01-connection-identity.yaml"
    ))?;
    for mut object in keysmith::manifest::parse(&identity.replace("[\"view\"]", "[\"view\", \"edit\"]"))
        .map_err(anyhow::Error::msg)?
    {
        object.metadata.namespace = Some(NAMESPACE.to_owned());
        keysmith::manifest::apply(&client, &object, "quickstart").await?;
    }
    Api::<AppConnection>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &connection).await?;
    let policy: KeyRotationPolicy = serde_json::from_value(json!({
        "apiVersion": "keysmith.dev/v1alpha1", "kind": "KeyRotationPolicy",
        "metadata": {"name": "bench", "namespace": NAMESPACE},
        "spec": {"rotateEvery": "720h", "gracePeriod": "1h"}
    }))?;
    Api::<KeyRotationPolicy>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &policy).await?;

    // The harness follows the accounts through a watch: listing thousands
    // of them every second would make the harness the apiserver's main load.
    let watched = Watched::start(&client).await?;
    let operator = Operator::start(cp, noop)?;
    operator.wait_ready(Duration::from_secs(120)).await?;
    wait_connection_ready(&client, Duration::from_secs(60)).await?;

    // Time to Ready, and what it cost.
    let mark = cp.audit_mark()?;
    let calls_before = operator.provider_calls().await?;
    let started = Instant::now();
    eprintln!("   creating {n} IntegrationAccounts");
    create_accounts(&client, n, args.client_concurrency).await?;
    poll(&operator, "every account Ready", timeout, || async {
        Ok(watched.store.state().iter().filter(|a| is_ready(a)).count() >= n)
    })
    .await?;
    let ready = started.elapsed();
    eprintln!("   all {n} Ready after {:.1} s", ready.as_secs_f64());
    // Let the reconciles that Ready itself triggers (the output Secret's and
    // the status's own watch events) finish before counting.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to_ready = Requests::from(&cp.audit_records_since(mark)?);
    let provider_calls_to_ready = operator.provider_calls().await? - calls_before;
    let hwm_ready_kib = operator.hwm_kib()?;

    // Steady state.
    eprintln!("   steady state for {} s", args.steady_secs);
    let mark = cp.audit_mark()?;
    let calls_before = operator.provider_calls().await?;
    let by_op_before = operator.provider_calls_by_operation().await?;
    let steady_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let steady_window = steady_started.elapsed();
    let steady = Requests::from(&cp.audit_records_since(mark)?);
    let steady_provider_calls = operator.provider_calls().await? - calls_before;
    let by_op = operator.provider_calls_by_operation().await?;
    let delta = |op: &str| by_op.get(op).copied().unwrap_or(0.0) - by_op_before.get(op).copied().unwrap_or(0.0);
    let steady_provider_reads: f64 = READ_OPERATIONS.iter().map(|op| delta(op)).sum();
    let steady_drift_checks = delta("observe_account");
    eprintln!("     steady provider calls by operation: {:?}", {
        let mut ops: Vec<(String, f64)> =
            by_op.keys().map(|op| (op.clone(), delta(op))).filter(|(_, d)| *d > 0.0).collect();
        ops.sort_by(|a, b| a.0.cmp(&b.0));
        ops
    });
    let hwm_steady_kib = operator.hwm_kib()?;

    // Rotation storm: every account due at once.
    let storm = if args.no_storm {
        None
    } else {
        eprintln!("   rotation storm");
        Some(storm(args, cp, &client, &watched, &operator, n, timeout).await?)
    };
    let hwm_storm_kib = operator.hwm_kib()?;
    operator.stop().await;
    watched.task.abort();

    Ok(RunResult {
        provider: provider.into(),
        n,
        unrelated,
        ready,
        to_ready,
        provider_calls_to_ready,
        steady_window,
        steady,
        steady_provider_calls,
        steady_provider_reads,
        steady_drift_checks,
        hwm_ready_kib,
        hwm_steady_kib,
        hwm_storm_kib,
        storm,
    })
}

async fn storm(
    args: &Args,
    cp: &ControlPlane,
    client: &Client,
    watched: &Watched,
    operator: &Operator,
    n: usize,
    timeout: Duration,
) -> Result<Storm> {
    let mark = cp.audit_mark()?;
    let stop = Arc::new(AtomicBool::new(false));
    let metrics_url = operator.metrics_url();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut samples: Vec<(Instant, f64)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                if let Ok(total) = provider_calls(&http, &metrics_url).await {
                    samples.push((at, total));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        })
    };
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let (kind, duration, published, max_published_10s) = if args.storm == "manual" {
        let stamp = format!("storm-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs());
        let started = Instant::now();
        let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": stamp}}});
        stream::iter(0..n)
            .map(|i| {
                let accounts = accounts.clone();
                let patch = patch.clone();
                async move { accounts.patch(&account_name(i), &PatchParams::default(), &Patch::Merge(&patch)).await }
            })
            .buffer_unordered(args.client_concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        poll(operator, "every account rotated", timeout, || async {
            Ok(watched
                .store
                .state()
                .iter()
                .filter(|a| {
                    is_ready(a) && a.status.as_ref().and_then(|s| s.last_rotation_request.as_deref()) == Some(&stamp)
                })
                .count()
                >= n)
        })
        .await?;
        ("manual (rotate-now)".to_owned(), started.elapsed(), None, 0)
    } else {
        scheduled_storm(args, client, watched, operator, n, timeout).await?
    };
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    let requests = Requests::from(&cp.audit_records_since(mark)?);

    let (mut max_rate_1s, mut max_excess) = (0.0f64, 0.0f64);
    for (i, (t0, c0)) in samples.iter().enumerate() {
        for (t1, c1) in &samples[i + 1..] {
            let dt = t1.duration_since(*t0).as_secs_f64();
            // A sample's instant is when the scrape was sent; the count is
            // read a little later, so allow one scrape interval of slack.
            let bound = f64::from(args.burst) + args.rate * (dt + 0.25);
            max_excess = max_excess.max(c1 - c0 - bound);
            if (0.9..=1.1).contains(&dt) {
                max_rate_1s = max_rate_1s.max((c1 - c0) / dt);
            }
        }
    }
    let provider_calls = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => last.1 - first.1,
        _ => 0.0,
    };
    Ok(Storm {
        kind,
        duration,
        published,
        max_published_10s,
        provider_calls,
        max_rate_1s,
        max_excess: max_excess.max(0.0),
        requests,
    })
}

/// Every account due in the same minute: the policy gets a daily cron
/// schedule for a minute far enough ahead for every account to have
/// recomputed its next rotation, plus a jitter. Returns the storm's kind,
/// the time from that minute until all had rotated, the publish times of the
/// new keys (first, median, last, in seconds after the minute) and the most
/// published in any 10 s.
async fn scheduled_storm(
    args: &Args,
    client: &Client,
    watched: &Watched,
    operator: &Operator,
    n: usize,
    timeout: Duration,
) -> Result<(String, Duration, Option<[f64; 3]>, usize)> {
    let current_key =
        |a: &IntegrationAccount| a.status.as_ref().and_then(|s| s.current_key.as_ref()).map(|k| k.id.clone());
    let before: BTreeMap<String, Option<String>> =
        watched.store.state().iter().map(|a| (a.name_any(), current_key(a))).collect();
    let jitter = match args.storm_jitter {
        0 => ((n as f64 * 6.0 / args.rate).ceil() as u64).max(10),
        j => j,
    };
    // The policy change reaches every account as one status write each
    // (the next rotation), no provider call: allow ~100 writes/s, plus a minute.
    let lead = Duration::from_secs(60 + n as u64 / 100);
    let now = jiff::Timestamp::now();
    let minute = now
        .checked_add(jiff::SignedDuration::try_from(lead)?)?
        .round(jiff::TimestampRound::new().smallest(jiff::Unit::Minute).mode(jiff::RoundMode::Ceil))?;
    let at = minute.to_zoned(jiff::tz::TimeZone::UTC);
    let cron = format!("{} {} * * *", at.minute(), at.hour());
    let policies: Api<KeyRotationPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"spec": {"schedule": cron, "timeZone": "UTC", "jitter": format!("{jitter}s")}});
    policies.patch("bench", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    eprintln!("   every account due at {minute} (cron {cron:?}), jitter {jitter} s");
    let wait = Duration::try_from(minute.duration_since(jiff::Timestamp::now())).unwrap_or_default();
    tokio::time::sleep(wait).await;
    let started = Instant::now();
    poll(operator, "every account rotated", timeout, || async {
        Ok(watched
            .store
            .state()
            .iter()
            .filter(|a| is_ready(a) && current_key(a).is_some() && before.get(&a.name_any()) != Some(&current_key(a)))
            .count()
            >= n)
    })
    .await?;
    let duration = started.elapsed();
    let mut offsets: Vec<f64> = watched
        .store
        .state()
        .iter()
        .filter_map(|a| {
            let status = a.status.as_ref()?;
            let id = &status.current_key.as_ref()?.id;
            let record = status.keys.iter().find(|k| &k.id == id)?;
            Some(record.published_at.as_ref()?.0.duration_since(minute).as_secs_f64())
        })
        .collect();
    offsets.sort_by(f64::total_cmp);
    let published = (!offsets.is_empty()).then(|| [offsets[0], offsets[offsets.len() / 2], offsets[offsets.len() - 1]]);
    let max_published_10s = offsets
        .iter()
        .enumerate()
        .map(|(i, t0)| offsets[i..].iter().take_while(|t| **t < t0 + 10.0).count())
        .max()
        .unwrap_or(0);
    // Back to the plain period, so that nothing else falls due.
    let patch = json!({"spec": {"schedule": null, "jitter": null}});
    policies.patch("bench", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok((format!("scheduled, jitter {jitter} s"), duration, published, max_published_10s))
}

fn is_ready(account: &IntegrationAccount) -> bool {
    account
        .status
        .as_ref()
        .is_some_and(|s| s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn account_name(i: usize) -> String {
    format!("acct-{i:05}")
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

async fn create_unrelated_secrets(client: &Client, count: usize, concurrency: usize) -> Result<()> {
    create_namespace(client, UNRELATED_NAMESPACE).await?;
    let api: Api<Secret> = Api::namespaced(client.clone(), UNRELATED_NAMESPACE);
    let value = "x".repeat(1024);
    stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let value = value.clone();
            async move {
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {"name": format!("unrelated-{i:06}")},
                    "stringData": {"payload": value},
                }))?;
                api.create(&PostParams::default(), &secret).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn create_accounts(client: &Client, n: usize, concurrency: usize) -> Result<()> {
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), NAMESPACE);
    stream::iter(0..n)
        .map(|i| {
            let (accounts, bindings) = (accounts.clone(), bindings.clone());
            async move {
                let name = account_name(i);
                let binding: RoleBinding = serde_json::from_value(json!({
                    "apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding",
                    "metadata": {"name": format!("{name}-view"), "namespace": NAMESPACE},
                    "spec": {"accountRef": {"name": name}, "roles": ["view"]}
                }))?;
                bindings.create(&PostParams::default(), &binding).await?;
                let account: IntegrationAccount = serde_json::from_value(json!({
                    "apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {
                        "connectionRef": {"name": "bench"},
                        "secret": {"name": format!("{name}-credentials")},
                        "rotationPolicyRef": {"name": "bench"},
                        "deletionPolicy": "Delete",
                    }
                }))?;
                accounts.create(&PostParams::default(), &account).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn wait_connection_ready(client: &Client, timeout: Duration) -> Result<()> {
    let api: Api<AppConnection> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + timeout;
    loop {
        let conn = api.get("bench").await?;
        let conditions = conn.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
        if conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("AppConnection bench is not Ready after {timeout:?}: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `check` every second until it holds; fails after `timeout` or when
/// the operator exits.
async fn poll<F, Fut>(operator: &Operator, what: &str, timeout: Duration, check: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if !operator.alive() {
            bail!("the operator exited while waiting for {what}; its log: {}", operator.log_tail());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; operator log: {}", operator.log_tail());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The bench namespace's IntegrationAccounts, as a watch keeps them.
struct Watched {
    store: kube::runtime::reflector::Store<IntegrationAccount>,
    task: tokio::task::JoinHandle<()>,
}

impl Watched {
    async fn start(client: &Client) -> Result<Self> {
        use kube::runtime::{reflector, watcher, WatchStreamExt};
        let (store, writer) = reflector::store();
        let api: Api<IntegrationAccount> = Api::namespaced(client.clone(), NAMESPACE);
        let stream = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
        let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
        store.wait_until_ready().await.map_err(|e| anyhow!("watching IntegrationAccounts: {e}"))?;
        Ok(Self { store, task })
    }
}

/// The release `keysmith run`, a separate process, as the operator user.
struct Operator {
    child: std::sync::Mutex<Child>,
    pid: u32,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn start(cp: &ControlPlane, noop: bool) -> Result<Operator> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("operator.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_keysmith"));
        command
            .arg("run")
            .arg("--kubeconfig")
            .arg(cp.operator_kubeconfig_path())
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("KEYSMITH_LOG", std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("KEYSMITH_FAILPOINT")
            .env_remove("KEYSMITH_METRICS_ADDR")
            .env_remove("KEYSMITH_LEADER_ELECT")
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if noop {
            command.env(keysmith::provider::noop::ENABLE_ENV, "1");
        } else {
            command.env_remove(keysmith::provider::noop::ENABLE_ENV);
        }
        let child = command.spawn().context("starting target/release/keysmith run")?;
        let pid = child.id();
        Ok(Operator { child: std::sync::Mutex::new(child), pid, port, log, _dir: dir })
    }

    fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }

    fn alive(&self) -> bool {
        match self.child.lock() {
            Ok(mut child) => matches!(child.try_wait(), Ok(None)),
            Err(_) => false,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if !self.alive() {
                bail!("the operator exited at start: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("the operator is not ready after {timeout:?}: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn provider_calls(&self) -> Result<f64> {
        provider_calls(&reqwest::Client::new(), &self.metrics_url()).await
    }

    async fn provider_calls_by_operation(&self) -> Result<HashMap<String, f64>> {
        provider_calls_by_operation(&reqwest::Client::new(), &self.metrics_url()).await
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    fn hwm_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{}/status", self.pid))
    }

    async fn stop(self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The sum of `keysmith_provider_requests_total` over every label set.
async fn provider_calls(http: &reqwest::Client, url: &str) -> Result<f64> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("keysmith_provider_requests_total"))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum())
}

/// Provider operations that change nothing in the target app.
const READ_OPERATIONS: [&str; 5] = ["observe_account", "list_roles", "list_keys", "verify_connection", "verify_key"];

/// `keysmith_provider_requests_total` summed per `operation` label.
async fn provider_calls_by_operation(http: &reqwest::Client, url: &str) -> Result<HashMap<String, f64>> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    let mut by_op = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("keysmith_provider_requests_total{")) {
        let Some(op) = line.split("operation=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        *by_op.entry(op.to_owned()).or_insert(0.0) += value;
    }
    Ok(by_op)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn print_result(r: &RunResult) {
    let per = |x: usize| x as f64 / r.n as f64;
    eprintln!(
        "   {} N={} unrelated={}: Ready in {:.1} s; per account to Ready: {:.2} writes ({:.2} without events), {:.2} reads, {:.2} provider calls",
        r.provider,
        r.n,
        r.unrelated,
        r.ready.as_secs_f64(),
        per(r.to_ready.writes),
        per(r.to_ready.writes_without_events()),
        per(r.to_ready.reads),
        r.provider_calls_to_ready / r.n as f64
    );
    eprintln!("     writes to Ready: {:?}", r.to_ready.writes_by);
    eprintln!("     reads to Ready: {:?}", r.to_ready.reads_by);
    eprintln!("     steady writes: {:?}; reads: {:?}", r.steady.writes_by, r.steady.reads_by);
    if let Some(s) = &r.storm {
        eprintln!("     storm writes: {:?}", s.requests.writes_by);
        eprintln!("     storm reads: {:?}", s.requests.reads_by);
    }
}

fn print_tables(args: &Args, results: &[RunResult]) {
    // The writes an account cannot do without, the dry run of its output
    // Secret before the first key is issued among them.
    let minimum = |provider: &str| if provider == "noop" { 6.0 } else { 10.0 };
    println!("\n### Time to Ready and apiserver requests per account (operator user, watches excluded)\n");
    println!("| provider | N | time to Ready (s) | accounts/s | writes/account (excl. events) | events/account | minimum writes | ratio | reads/account | provider calls/account |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results.iter().filter(|r| r.unrelated == 0) {
        let n = r.n as f64;
        let writes = r.to_ready.writes_without_events() as f64 / n;
        let events = (r.to_ready.writes - r.to_ready.writes_without_events()) as f64 / n;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {:.2}x | {:.2} | {:.2} |",
            r.provider,
            r.n,
            r.ready.as_secs_f64(),
            n / r.ready.as_secs_f64(),
            writes,
            events,
            minimum(&r.provider),
            writes / minimum(&r.provider),
            r.to_ready.reads as f64 / n,
            r.provider_calls_to_ready / n
        );
    }
    println!("\n### Steady state (N accounts unchanged)\n");
    println!("| provider | N | window (s) | apiserver writes/min | of which events | apiserver reads/min | provider calls/min | of which reads | accounts drift-checked |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results.iter().filter(|r| r.unrelated == 0) {
        let minutes = r.steady_window.as_secs_f64() / 60.0;
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.provider,
            r.n,
            r.steady_window.as_secs_f64(),
            r.steady.writes as f64 / minutes,
            (r.steady.writes - r.steady.writes_without_events()) as f64 / minutes,
            r.steady.reads as f64 / minutes,
            r.steady_provider_calls / minutes,
            r.steady_provider_reads / minutes,
            r.steady_drift_checks
        );
    }
    println!("\n### Operator peak RSS (VmHWM, MiB)\n");
    println!("| provider | N | unrelated Secrets | after Ready | after steady state | after storm |");
    println!("|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.provider,
            r.n,
            r.unrelated,
            mib(r.hwm_ready_kib),
            mib(r.hwm_steady_kib),
            mib(r.hwm_storm_kib)
        );
    }
    println!("\n### Rotation storm (every account due at once; budget {} req/s, burst {})\n", args.rate, args.burst);
    println!("| provider | N | unrelated Secrets | storm | time until all rotated (s) | new keys published at (s after due: first / median / last) | most published in 10 s | provider calls | mean calls/s | max calls in 1 s | max excess over burst + rate*t | writes/account (excl. events) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        if let Some(s) = &r.storm {
            let published = s.published.map_or("-".to_owned(), |[a, b, c]| format!("{a:.0} / {b:.0} / {c:.0}"));
            println!(
                "| {} | {} | {} | {} | {:.1} | {} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} |",
                r.provider,
                r.n,
                r.unrelated,
                s.kind,
                s.duration.as_secs_f64(),
                published,
                s.max_published_10s,
                s.provider_calls,
                s.provider_calls / s.duration.as_secs_f64(),
                s.max_rate_1s,
                s.max_excess,
                s.requests.writes_without_events() as f64 / r.n as f64
            );
        }
    }
}

//! The zero-downtime campaign (RELIABILITY.md): per provider, an account is
//! rotated again and again while two consumers call the target app with
//! its key without pause, the way pods read credentials:
//!
//! - **mounted file**: the key as a Secret volume, which the kubelet
//!   refreshes at its own pace: here at every sync of a simulated kubelet,
//!   `KEYSMITH_ZD_KUBELET` seconds apart (default 3), at a phase drawn from
//!   `KEYSMITH_ZD_SEED` (each provider's its own).
//!   The consumer reads the file before each call;
//! - **environment variables**: the key read once, when the container
//!   starts. Its Deployment is the policy's restart target: keysmith rolls
//!   it after each rotation, the real Deployment and ReplicaSet
//!   controllers replace the pod, and the test plays the kubelet: a new pod
//!   reads the Secret when it starts, 1 s later it is marked ready, and
//!   traffic is spread over the ready pods as a Service does. The policy
//!   uses confirmed rollover (`confirmRollout`), so the old key stays until
//!   the rollout is complete.
//!
//! A call is the provider's own check of a key against the target (a
//! login, a signed request, a token review). Each rotation waits until the
//! replaced key is revoked before the next one starts, so every rotation
//! runs its whole course. It reports the failed calls per consumer and per
//! grace period, and the calls a consumer could not make (no ready pod);
//! it asserts that each consumer made calls, and 0 failed calls for grace
//! periods of at least the kubelet's delay and 2 s more.
//!
//! `KEYSMITH_ZD_SEED`, `KEYSMITH_ZD_ROTATIONS` (default 4), `KEYSMITH_ZD_GRACE` (grace periods
//! to try, in seconds, comma-separated; default `5`), `KEYSMITH_ZD_KUBELET`
//! and `KEYSMITH_ZD_PROVIDERS` (default `kubernetes,postgres,aws_iam`)
//! choose the run; providers run side by side. The providers whose target
//! keeps one key per account (scim: a User's password; oauth2: a client's
//! secret) are not in it: a rotation there ends the old key at once, by the
//! target's design, and README.md says so.

#[path = "common/campaign.rs"]
mod campaign;
mod common;
#[path = "common/invariants.rs"]
mod invariants;
#[path = "common/moto_server.rs"]
mod moto_server;
#[path = "common/pg_server.rs"]
mod pg_server;
#[path = "common/scim_server.rs"]
mod scim_server;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{apply_yaml, control_plane, kubernetes_connection_identity, Operator, TestNamespace};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Secret},
};
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{kubernetes::KubernetesProvider, AccountRequest, IssuedKey, KeyMaterial, Provider, ProviderError},
};
use kube::{
    api::{Api, ListParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use moto_server::MotoServer;
use pg_server::{PgServer, ADMIN, ADMIN_PASSWORD};
use rand::{rngs::StdRng, Rng, SeedableRng};
use scim_server::ScimServer;
use serde_json::json;

/// How often each consumer calls the target.
const CALL_EVERY: Duration = Duration::from_millis(250);
/// From a pod's creation until it is ready.
const POD_START: Duration = Duration::from_secs(1);

struct Target {
    name: String,
    provider: Arc<dyn Provider>,
    role: String,
    spec: String,
}

impl Target {
    fn slug(&self) -> String {
        self.name.replace('_', "-")
    }
}

/// A key as the Secret holds it: its id (the Secret's annotation) and data.
type Credentials = (String, BTreeMap<String, String>);

async fn secret_data(secrets: &Api<Secret>, name: &str) -> Option<Credentials> {
    let secret = secrets.get_opt(name).await.ok()??;
    let id = secret.metadata.annotations.as_ref()?.get("keysmith.dev/key-id")?.clone();
    Some((id, secret.data?.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect()))
}

/// Calls made and failed, per consumer, with the failures' causes.
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    failed: AtomicUsize,
    /// Calls not made: no ready pod to make them.
    gaps: AtomicUsize,
    causes: Mutex<BTreeMap<String, usize>>,
    /// The first few failures' messages (they name key ids, never keys).
    examples: Mutex<Vec<String>>,
}

impl Tally {
    async fn call(&self, provider: &dyn Provider, request: &AccountRequest, credentials: &Credentials) {
        let (id, material) = credentials.clone();
        let key = IssuedKey { id, expires_at: None, material: KeyMaterial::new(material) };
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = provider.verify_key(request, &key).await {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let cause = match &error {
                ProviderError::Invalid(_) => "refused",
                ProviderError::Unauthorized(_) => "unauthorized",
                // The aws_iam check, given no time to wait: the key was refused.
                other if other.to_string().contains("was not accepted within") => "refused",
                other => other.category(),
            };
            *self.causes.lock().unwrap().entry(cause.to_owned()).or_default() += 1;
            let mut examples = self.examples.lock().unwrap();
            if examples.len() < 3 {
                examples.push(format!("{}: {error}", jiff::Timestamp::now()));
            }
        }
    }

    fn take(&self) -> (usize, usize, BTreeMap<String, usize>) {
        (
            self.calls.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
            std::mem::take(&mut *self.causes.lock().unwrap()),
        )
    }
}

/// What a consumer calls the target as, and where it counts its calls.
#[derive(Clone)]
struct Caller {
    provider: Arc<dyn Provider>,
    request: AccountRequest,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
}

/// The consumer of the mounted file: a simulated kubelet copies the
/// Secret into the "file" every `period`, from a phase `rng` draws, and the
/// consumer calls with whatever the file holds.
fn mounted_file_consumer(
    caller: Caller,
    secrets: Api<Secret>,
    secret: String,
    period: Duration,
    rng: &mut StdRng,
) -> tokio::task::JoinHandle<()> {
    let phase = rng.random_range(0..period.as_millis().max(1) as u64);
    let Caller { provider, request, tally, stop } = caller;
    let file: Arc<Mutex<Option<Credentials>>> = Arc::default();
    let kubelet = {
        let (file, stop, secrets, secret) = (file.clone(), stop.clone(), secrets.clone(), secret.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(phase)).await;
            while !stop.load(Ordering::Relaxed) {
                if let Some(data) = secret_data(&secrets, &secret).await {
                    *file.lock().unwrap() = Some(data);
                }
                tokio::time::sleep(period).await;
            }
        })
    };
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let credentials = file.lock().unwrap().clone();
            if let Some(credentials) = credentials {
                tally.call(provider.as_ref(), &request, &credentials).await;
            }
            tokio::time::sleep(CALL_EVERY).await;
        }
        let _ = kubelet.await;
    })
}

/// The consumer of environment variables: each pod of the Deployment
/// reads the Secret when it starts; the test is its kubelet (marks it
/// ready after [`POD_START`]); calls go to the ready pods in turn.
fn env_var_consumer(
    caller: Caller,
    client: Client,
    ns: String,
    app: String,
    secret: String,
) -> tokio::task::JoinHandle<()> {
    let Caller { provider, request, tally, stop } = caller;
    let ready: Arc<Mutex<BTreeMap<String, Credentials>>> = Arc::default();
    let kubelet = {
        let (ready, stop) = (ready.clone(), stop.clone());
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(client, &ns);
        tokio::spawn(async move {
            let mut starting: BTreeMap<String, (Instant, Credentials)> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(list) = pods.list(&ListParams::default().labels(&format!("app={app}"))).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let live: Vec<Pod> =
                    list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
                ready.lock().unwrap().retain(|name, _| live.iter().any(|p| p.name_any() == *name));
                starting.retain(|name, _| live.iter().any(|p| p.name_any() == *name));
                for pod in &live {
                    let name = pod.name_any();
                    if ready.lock().unwrap().contains_key(&name) {
                        continue;
                    }
                    match starting.get(&name) {
                        None => {
                            // The container starts: its environment is the Secret as it is now.
                            if let Some(data) = secret_data(&secrets, &secret).await {
                                starting.insert(name, (Instant::now(), data));
                            }
                        }
                        Some((since, _)) if since.elapsed() >= POD_START => {
                            let now = jiff::Timestamp::now().to_string();
                            let status = json!({"status": {"phase": "Running", "conditions": [
                                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                                {"type": "Ready", "status": "True", "lastTransitionTime": now}]}});
                            if pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok() {
                                let (_, data) = starting.remove(&name).expect("starting");
                                ready.lock().unwrap().insert(name, data);
                            }
                        }
                        Some(_) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::spawn(async move {
        let mut turn = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let credentials = {
                let ready = ready.lock().unwrap();
                let pods: Vec<&Credentials> = ready.values().collect();
                (!pods.is_empty()).then(|| pods[turn % pods.len()].clone())
            };
            turn += 1;
            match credentials {
                Some(credentials) => tally.call(provider.as_ref(), &request, &credentials).await,
                // Once serving, no ready pod is downtime too (not keysmith's).
                None if tally.calls.load(Ordering::Relaxed) > 0 => {
                    tally.gaps.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            tokio::time::sleep(CALL_EVERY).await;
        }
        let _ = kubelet.await;
    })
}

/// Rotates `name` once: asks for it, waits until the new key is current,
/// then until the replaced key is revoked. The time it took.
async fn rotate(accounts: &Api<IntegrationAccount>, name: &str, value: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let before = accounts.get(name).await.map_err(|e| e.to_string())?;
    let old = before.status.as_ref().and_then(|s| s.current_key.as_ref()).map(|k| k.id.clone()).ok_or("no key")?;
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": value}}});
    accounts.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| e.to_string())?;
    let deadline = started + Duration::from_secs(180);
    loop {
        if let Ok(account) = accounts.get(name).await {
            let status = account.status.unwrap_or_default();
            let rotated = status.last_rotation_request.as_deref() == Some(value)
                && status.current_key.as_ref().is_some_and(|k| k.id != old);
            let revoked = status.keys.iter().any(|k| k.id == old && k.state == KeyState::Revoked);
            if rotated && revoked {
                return Ok(started.elapsed());
            }
        }
        if Instant::now() > deadline {
            let status = accounts.get(name).await.ok().and_then(|a| a.status).unwrap_or_default();
            let conditions: Vec<String> = status
                .common
                .conditions
                .iter()
                .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                .collect();
            let keys: Vec<String> = status.keys.iter().map(|k| format!("{} {:?}", k.id, k.state)).collect();
            return Err(format!(
                "rotation {value} of {name} did not complete within 180 s (old key {old}; last request {:?}; keys {keys:?}; {conditions:#?})",
                status.last_rotation_request
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn consumers_see_no_failed_call_through_rotations() {
    let seed: u64 = campaign::env("KEYSMITH_ZD_SEED", 20_261_207);
    let mut rng = StdRng::seed_from_u64(seed);
    let rotations: usize = campaign::env("KEYSMITH_ZD_ROTATIONS", 4);
    let kubelet = Duration::from_secs(campaign::env("KEYSMITH_ZD_KUBELET", 3));
    let graces: Vec<u64> = std::env::var("KEYSMITH_ZD_GRACE")
        .unwrap_or_else(|_| "5".into())
        .split(',')
        .filter_map(|g| g.trim().parse().ok())
        .collect();
    assert!(!graces.is_empty(), "KEYSMITH_ZD_GRACE: grace periods in seconds, comma-separated");
    let providers = campaign::providers("KEYSMITH_ZD_PROVIDERS", "kubernetes,postgres,aws_iam");
    println!(
        "zero-downtime campaign: seed {seed}, {rotations} rotations per grace period {graces:?} s, kubelet every {} s, providers {providers:?}",
        kubelet.as_secs()
    );
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "zd").await;

    let pg = if providers.iter().any(|p| p == "postgres") { Some(PgServer::start().await) } else { None };
    let scim = if providers.iter().any(|p| p == "scim") { Some(ScimServer::start().await) } else { None };
    let moto = if providers.iter().any(|p| p == "aws_iam") { Some(MotoServer::start().await) } else { None };
    let mut setup = kubernetes_connection_identity(&["view"]);
    let mut targets = Vec::new();
    for name in &providers {
        let target = match name.as_str() {
            "kubernetes" => Target {
                name: name.clone(),
                provider: Arc::new(KubernetesProvider::new(
                    client.clone(),
                    cp.server_url().to_owned(),
                    Some(cp.ca_pem().to_owned()),
                    false,
                )),
                role: "view".into(),
                spec: "{kubernetes: {}}".into(),
            },
            "postgres" => {
                let pg = pg.as_ref().expect("postgres started");
                pg.superuser().await.batch_execute("CREATE ROLE zd_reader NOLOGIN").await.expect("the role");
                setup.push_str(&campaign::postgres_admin(ADMIN, ADMIN_PASSWORD));
                Target {
                    name: name.clone(),
                    provider: Arc::new(pg.provider()),
                    role: "zd_reader".into(),
                    spec: campaign::postgres_spec(pg.port),
                }
            }
            "scim" => {
                let scim = scim.as_ref().expect("the SCIM server started");
                scim.create_group("ZD Readers").await;
                setup.push_str(&campaign::scim_admin(&scim.token));
                Target {
                    name: name.clone(),
                    provider: Arc::new(scim.provider()),
                    role: "ZD Readers".into(),
                    spec: campaign::scim_spec(&scim.base_url),
                }
            }
            "aws_iam" => {
                let moto = moto.as_ref().expect("moto started");
                setup.push_str(&campaign::aws_admin(&moto.admin_key));
                Target {
                    name: name.clone(),
                    // One attempt per call, as a consumer makes: the provider's
                    // own check waits for IAM's eventual consistency.
                    provider: Arc::new(moto.provider().with_verify_window(Duration::ZERO)),
                    role: moto.policy_arn("ks-read"),
                    spec: campaign::aws_spec(&moto.endpoint),
                }
            }
            other => panic!("unknown provider {other}"),
        };
        targets.push(target);
    }
    // The connections' identity also reads the admin credentials, and the
    // restart targets (confirmed rollover).
    setup.push_str(&campaign::credentials_reader("\n- {apiGroups: [apps], resources: [deployments], verbs: [get]}"));
    let first_grace = graces.first().copied().unwrap_or(5);
    for target in &targets {
        let slug = target.slug();
        setup.push_str(&format!(
            r#"apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: {slug}}}
spec: {{provider: {spec}, serviceAccountName: keysmith, rateLimit: {{requestsPerSecond: 50, burst: 50}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: zd-{slug}}}
spec:
  rotateEvery: 24h
  gracePeriod: {first_grace}s
  restartTargets: [{{kind: Deployment, name: app-{slug}}}]
  confirmRollout: {{maxWait: 5m}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: zd-{slug}}}
spec: {{connectionRef: {{name: {slug}}}, secret: {{name: zd-{slug}-key}}, rotationPolicyRef: {{name: zd-{slug}}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: zd-{slug}-roles}}
spec: {{accountRef: {{name: zd-{slug}}}, roles: ["{role}"]}}
---
"#,
            spec = target.spec,
            role = target.role
        ));
    }
    apply_yaml(&client, &ns.name, &setup).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    for target in &targets {
        let app = format!("app-{}", target.slug());
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": app},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                     "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": app}},
                                  "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}}
        }))
        .unwrap();
        deployments.create(&PostParams::default(), &deployment).await.unwrap();
    }

    let operator = Operator::start(cp, &ns.name, &[]);
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    let mut tallies = Vec::new();
    for target in &targets {
        let slug = target.slug();
        let account = common::ready_account(&client, &ns.name, &format!("zd-{slug}")).await;
        let request = invariants::request(&account);
        let (file, vars) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let caller = Caller { provider: target.provider.clone(), request, tally: file.clone(), stop: stop.clone() };
        consumers.push(mounted_file_consumer(
            caller.clone(),
            secrets.clone(),
            format!("zd-{slug}-key"),
            kubelet,
            &mut rng,
        ));
        let caller = Caller { tally: vars.clone(), ..caller };
        consumers.push(env_var_consumer(
            caller,
            client.clone(),
            ns.name.clone(),
            format!("app-{slug}"),
            format!("zd-{slug}-key"),
        ));
        tallies.push((file, vars));
    }
    // Both consumers are up before the first rotation.
    tokio::time::sleep(kubelet + POD_START + Duration::from_secs(2)).await;
    for (file, vars) in &tallies {
        file.take();
        vars.take();
    }

    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for grace in &graces {
        for target in &targets {
            let patch = json!({"spec": {"gracePeriod": format!("{grace}s")}});
            Api::<keysmith::api::KeyRotationPolicy>::namespaced(client.clone(), &ns.name)
                .patch(&format!("zd-{}", target.slug()), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        let phase = Instant::now();
        let runs = targets.iter().map(|target| {
            let accounts = accounts.clone();
            let name = format!("zd-{}", target.slug());
            async move {
                let mut longest = Duration::ZERO;
                for n in 0..rotations {
                    match rotate(&accounts, &name, &format!("g{grace}-{n}")).await {
                        Ok(took) => longest = longest.max(took),
                        Err(error) => return Err(error),
                    }
                }
                Ok(longest)
            }
        });
        let results = futures::future::join_all(runs).await;
        for ((target, (file, vars)), result) in targets.iter().zip(&tallies).zip(results) {
            let (file_calls, file_failed, file_causes) = file.take();
            let (var_calls, var_failed, var_causes) = vars.take();
            let gaps = vars.gaps.swap(0, Ordering::Relaxed);
            if file_calls == 0 || var_calls == 0 {
                failures.push(format!("{} at grace {grace} s: a consumer made no call", target.name));
            }
            let longest = match result {
                Ok(longest) => format!("{:.1} s", longest.as_secs_f64()),
                Err(error) => {
                    failures.push(error.clone());
                    error
                }
            };
            lines.push(format!(
                "{:10} grace {grace:2} s: mounted file {file_failed}/{file_calls} failed {file_causes:?}; env vars {var_failed}/{var_calls} failed {var_causes:?}, {gaps} not made (no ready pod); longest rotation {longest}",
                target.name
            ));
            if *grace >= kubelet.as_secs() + 2 && file_failed + var_failed > 0 {
                failures.push(format!(
                    "{} at grace {grace} s: {file_failed} failed calls from the mounted file, {var_failed} from env vars",
                    target.name
                ));
            }
        }
        println!(
            "{}  ({rotations} rotations each in {:.0} s)",
            lines[lines.len() - targets.len()..].join("\n"),
            phase.elapsed().as_secs_f64()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        let _ = consumer.await;
    }
    println!(
        "--- zero-downtime campaign: {rotations} rotations per provider and grace period, kubelet every {} s ---",
        kubelet.as_secs()
    );
    for line in &lines {
        println!("{line}");
    }
    for (target, (file, vars)) in targets.iter().zip(&tallies) {
        for (consumer, tally) in [("mounted file", file), ("env vars", vars)] {
            for example in tally.examples.lock().unwrap().iter() {
                println!("{} {consumer}: {example}", target.name);
            }
        }
    }
    if !failures.is_empty() {
        println!("--- operator log ---\n{}", operator.logs());
    }
    drop(operator);
    assert!(failures.is_empty(), "{failures:#?}");
    ns.delete().await;
}

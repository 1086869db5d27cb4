//! One watch per kind, shared by every controller that needs it, and
//! per-consumer filters that let through only the changes a consumer acts on.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

use futures::{Stream, StreamExt};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A watched kind: its cache, and one event stream per consumer.
pub struct Watched<K: Resource<DynamicType = ()> + Clone + 'static, const N: usize> {
    /// The cache every consumer reads.
    pub store: Store<K>,
    /// One receiver per consumer.
    pub consumers: [UnboundedReceiverStream<watcher::Event<K>>; N],
}

/// Starts watching `api` (driven by the returned future) and fans its events
/// out to `N` consumer streams. Channels are unbounded so a slow consumer never
/// stalls the others; controllers drain their triggers promptly.
pub fn watch<K, const N: usize>(
    api: Api<K>,
    config: watcher::Config,
) -> (Watched<K, N>, impl std::future::Future<Output = ()> + Send)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let channels: [_; N] = std::array::from_fn(|_| mpsc::unbounded_channel());
    let senders: Vec<mpsc::UnboundedSender<watcher::Event<K>>> = channels.iter().map(|(tx, _)| tx.clone()).collect();
    let receivers = channels.map(|(_, rx)| UnboundedReceiverStream::new(rx));
    let kind = K::kind(&()).into_owned();
    // managedFields are the largest part of most objects' metadata and no
    // controller reads them: the caches keep everything else.
    let driver = watcher(api, config)
        .default_backoff()
        .modify(|obj| obj.meta_mut().managed_fields = None)
        .reflect(writer)
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        tracing::debug!(%kind, "cache synced");
                    }
                    for tx in &senders {
                        let _ = tx.send(event.clone());
                    }
                }
                Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying with backoff"),
            }
            futures::future::ready(())
        });
    (Watched { store: reader, consumers: receivers }, driver)
}

/// Objects whose `key` changed since last seen, and deleted objects.
/// `key` picks what the consumer cares about (say, the generation), so
/// status-only updates and resyncs of unchanged objects pass silently.
pub fn changes<K, S>(events: S, key: fn(&K) -> u64) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
    S: Stream<Item = watcher::Event<K>> + Send + 'static,
{
    let mut seen: HashMap<ObjectRef<K>, u64> = HashMap::new();
    events.flat_map(move |event| {
        let out: Vec<K> = match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                let hash = key(&obj);
                let reference = ObjectRef::from_obj(&obj);
                if seen.insert(reference, hash) == Some(hash) {
                    vec![]
                } else {
                    tracing::trace!(kind = %K::kind(&()), name = %obj.meta().name.as_deref().unwrap_or(""), "changed");
                    vec![obj]
                }
            }
            watcher::Event::Delete(obj) => {
                seen.remove(&ObjectRef::from_obj(&obj));
                vec![obj]
            }
            watcher::Event::Init | watcher::Event::InitDone => vec![],
        };
        futures::stream::iter(out.into_iter().map(Ok))
    })
}

/// Hashes anything hashable into the u64 `changes` compares.
pub fn hash_of(value: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The generation and deletion state: what most consumers act on.
pub fn generation<K: Resource>(obj: &K) -> u64 {
    let meta = obj.meta();
    hash_of((meta.generation, meta.deletion_timestamp.is_some()))
}

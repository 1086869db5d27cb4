//! Applying YAML manifests (what `kubectl apply --server-side -f` does), for
//! `keysmith dev` and the tests.

use std::path::Path;

use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery::{self, Scope},
    Client,
};

/// The field manager for what keysmith's CLI applies on a user's behalf.
/// Distinct from the operator's own manager: on apiservers before 1.22, a
/// status apply by the same manager would take over ownership of the spec
/// fields and orphan list items the user later removes.
pub const FIELD_MANAGER: &str = "keysmith-cli";

/// Failures reading or applying manifests.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A document is not a Kubernetes object.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The apiserver refused an object.
    #[error("applying {kind} {name} from {path}: {source}")]
    Apply {
        /// The file.
        path: String,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// The apiserver's answer.
        #[source]
        source: Box<kube::Error>,
    },
}

/// Every object in a multi-document YAML file.
pub fn read(path: &Path) -> Result<Vec<DynamicObject>, ManifestError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: display.clone(), source })?;
    parse(&text).map_err(|message| ManifestError::Parse { path: display, message })
}

/// Every object in a multi-document YAML text.
pub fn parse(text: &str) -> Result<Vec<DynamicObject>, String> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if object.types.is_none() {
            return Err("a document has no apiVersion/kind".into());
        }
        out.push(object);
    }
    Ok(out)
}

/// Every object of every `*.yaml` file in `dir`, in file-name order, with
/// the file it came from.
pub fn read_dir(dir: &Path) -> Result<Vec<(String, DynamicObject)>, ManifestError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| ManifestError::Read { path: dir.display().to_string(), source })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        for object in read(&file)? {
            objects.push((file.display().to_string(), object));
        }
    }
    Ok(objects)
}

/// Server-side applies every `*.yaml` file in `dir`, in file-name order.
pub async fn apply_dir(client: &Client, dir: &Path) -> Result<usize, ManifestError> {
    let objects = read_dir(dir)?;
    for (file, object) in &objects {
        apply(client, object, file).await?;
    }
    Ok(objects.len())
}

/// Deletes one object (in the background); gone already is fine.
pub async fn delete(client: &Client, object: &DynamicObject, path: &str) -> Result<(), ManifestError> {
    let (api, name, fail) = dynamic_api(client, object, path).await?;
    match api.delete(&name, &kube::api::DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(fail(source)),
    }
}

/// Whether the object still exists.
pub async fn exists(client: &Client, object: &DynamicObject, path: &str) -> Result<bool, ManifestError> {
    let (api, name, fail) = dynamic_api(client, object, path).await?;
    api.get_opt(&name).await.map(|o| o.is_some()).map_err(fail)
}

/// The API of an object's kind (namespaced where it is), its name, and how
/// to report a failure about it.
async fn dynamic_api(
    client: &Client,
    object: &DynamicObject,
    path: &str,
) -> Result<(Api<DynamicObject>, String, impl Fn(kube::Error) -> ManifestError), ManifestError> {
    let types = object.types.clone().unwrap_or_default();
    let name = object.metadata.name.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types)
        .map_err(|e| ManifestError::Parse { path: path.to_owned(), message: e.to_string() })?;
    let (kind, shown, path) = (types.kind.clone(), name.clone(), path.to_owned());
    let fail = move |source: kube::Error| ManifestError::Apply {
        path: path.clone(),
        kind: kind.clone(),
        name: shown.clone(),
        source: Box::new(source),
    };
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk).await.map_err(&fail)?;
    let api: Api<DynamicObject> = match (capabilities.scope, &object.metadata.namespace) {
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
    };
    Ok((api, name, fail))
}

/// Server-side applies one object.
pub async fn apply(client: &Client, object: &DynamicObject, path: &str) -> Result<(), ManifestError> {
    let types = object.types.clone().unwrap_or_default();
    let name = object.metadata.name.clone().unwrap_or_default();
    let fail = |source: kube::Error| ManifestError::Apply {
        path: path.to_owned(),
        kind: types.kind.clone(),
        name: name.clone(),
        source: Box::new(source),
    };
    let gvk = GroupVersionKind::try_from(&types)
        .map_err(|e| ManifestError::Parse { path: path.into(), message: e.to_string() })?;
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk).await.map_err(fail)?;
    let api: Api<DynamicObject> = match (capabilities.scope, &object.metadata.namespace) {
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
    };
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object)).await.map_err(fail)?;
    Ok(())
}

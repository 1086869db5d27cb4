//! The system-of-record feed: keysmith's inventory of integration
//! identities, served read-only to SaaS-management tools (Trelica and the
//! like) as app accounts, the way such tools ask in-house applications to
//! expose their users: REST under a versioned path (`/api/v1/accounts`,
//! cursor-paginated with `limit` and `after`, a `next` link), SCIM-style
//! `filter`s, and the same records as a read-only SCIM 2.0 `/scim/v2/Users`
//! view (`startIndex`, `count`). Off by default; it needs a credential (an
//! API token, or OAuth 2.0 client credentials exchanged at
//! `/api/v1/oauth/token`).
//!
//! A record is built from an IntegrationAccount's spec and status only:
//! names, the account's identity in the target app, its state, roles,
//! owner and times. Never a key, a key id or a Secret's name.

pub mod filter;
pub mod server;

use jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::api::{condition_types::DORMANT, ConnectionKind, IntegrationAccount};
use filter::{Field, Filter};

/// The most records one page holds.
pub const MAX_PAGE: usize = 1000;
/// Records per page unless asked otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// SCIM's core User schema.
pub const SCIM_USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// keysmith's extension of it.
pub const SCIM_EXTENSION: &str = "urn:keysmith:params:scim:schemas:extension:integration:2.0:User";
/// SCIM's list response.
pub const SCIM_LIST: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// SCIM's error message.
pub const SCIM_ERROR: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// One integration identity, as the feed shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The IntegrationAccount's uid: stable, and unique across the cluster.
    pub id: String,
    /// `<namespace>/<name>`.
    pub name: String,
    /// The IntegrationAccount's namespace.
    pub namespace: String,
    /// The provider (`zabbix`, `awsIam`...), once known.
    pub provider: Option<String>,
    /// The connection, `Kind/[namespace/]name`.
    pub connection: String,
    /// The account's identifier in the target app.
    pub external_id: Option<String>,
    /// The account's name in the target app (its audit-log name).
    pub external_name: Option<String>,
    /// `Active`, `Disabled`, `Dormant` or `Pending` (not created yet).
    pub status: &'static str,
    /// The roles it holds, `role` or `role on scope`.
    pub roles: Vec<String>,
    /// spec.owner.
    pub owner: Option<String>,
    /// spec.description.
    pub description: Option<String>,
    /// When the IntegrationAccount was created.
    pub created: Option<Timestamp>,
    /// When any key of it was last used, where the target reports it.
    pub last_used: Option<Timestamp>,
    /// When its live key was issued.
    pub key_issued: Option<Timestamp>,
    /// The latest of its creation, its conditions' transitions and its key's
    /// issue.
    pub last_modified: Option<Timestamp>,
}

impl Record {
    /// A record with every field empty, to ask which attributes exist.
    fn probe() -> Self {
        Record {
            id: String::new(),
            name: String::new(),
            namespace: String::new(),
            provider: None,
            connection: String::new(),
            external_id: None,
            external_name: None,
            status: "Pending",
            roles: Vec::new(),
            owner: None,
            description: None,
            created: None,
            last_used: None,
            key_issued: None,
            last_modified: None,
        }
    }

    /// The record of `account`.
    pub fn of(account: &IntegrationAccount) -> Self {
        let namespace = account.namespace().unwrap_or_default();
        let status = account.status.clone().unwrap_or_default();
        let external = status.account.as_ref();
        let dormant = status.common.conditions.iter().any(|c| c.type_ == DORMANT && c.status == "True");
        let state = match external {
            None => "Pending",
            Some(_) if dormant => "Dormant",
            Some(e) if e.disabled => "Disabled",
            Some(_) => "Active",
        };
        let reference = &account.spec.connection_ref;
        let connection = match reference.kind {
            ConnectionKind::AppConnection => format!("AppConnection/{namespace}/{}", reference.name),
            ConnectionKind::ClusterAppConnection => format!("ClusterAppConnection/{}", reference.name),
        };
        let created = account.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let key_issued = status.current_key.as_ref().map(|k| k.issued_at.0);
        let last_modified = created
            .into_iter()
            .chain(key_issued)
            .chain(status.common.conditions.iter().map(|c| c.last_transition_time.0))
            .max();
        Record {
            id: account.uid().unwrap_or_default(),
            name: format!("{namespace}/{}", account.name_any()),
            namespace,
            provider: external.map(|e| e.provider.clone()),
            connection,
            external_id: external.map(|e| e.id.clone()),
            external_name: external.and_then(|e| e.name.clone()),
            status: state,
            roles: status
                .roles
                .iter()
                .map(|r| match &r.scope {
                    Some(scope) => format!("{} on {scope}", r.role),
                    None => r.role.clone(),
                })
                .collect(),
            owner: account.spec.owner.clone(),
            description: account.spec.description.clone(),
            created,
            last_used: status.last_used_at.as_ref().map(|t| t.0),
            key_issued,
            last_modified,
        }
    }

    /// The REST form (`/api/v1/accounts`), in Trelica's naming: `...Dtm`
    /// times, `lastLoginDtm` for the last use.
    pub fn rest(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "namespace": self.namespace,
            "provider": self.provider,
            "connection": self.connection,
            "externalId": self.external_id,
            "externalName": self.external_name,
            "status": self.status,
            "roles": self.roles,
            "owner": self.owner,
            "description": self.description,
            "createdDtm": self.created.map(|t| t.to_string()),
            "lastLoginDtm": self.last_used.map(|t| t.to_string()),
            "keyIssuedDtm": self.key_issued.map(|t| t.to_string()),
            "lastModifiedDtm": self.last_modified.map(|t| t.to_string()),
            "deleted": false,
        })
    }

    /// The SCIM User form (`/scim/v2/Users`).
    pub fn scim(&self, location: &str) -> Value {
        json!({
            "schemas": [SCIM_USER, SCIM_EXTENSION],
            "id": self.id,
            "externalId": self.external_id,
            "userName": self.name,
            "displayName": self.external_name.clone().unwrap_or_else(|| self.name.clone()),
            "active": self.status == "Active",
            "roles": self.roles.iter().map(|r| json!({"value": r})).collect::<Vec<_>>(),
            "meta": {
                "resourceType": "User",
                "created": self.created.map(|t| t.to_string()),
                "lastModified": self.last_modified.map(|t| t.to_string()),
                "location": format!("{location}/{}", self.id),
            },
            SCIM_EXTENSION: {
                "namespace": self.namespace,
                "provider": self.provider,
                "connection": self.connection,
                "status": self.status,
                "owner": self.owner,
                "description": self.description,
                "lastUsed": self.last_used.map(|t| t.to_string()),
                "keyIssued": self.key_issued.map(|t| t.to_string()),
            },
        })
    }

    fn text(value: &Option<String>) -> Field {
        value.clone().map_or(Field::Null, Field::Str)
    }

    fn time(value: Option<Timestamp>) -> Field {
        value.map_or(Field::Null, Field::Time)
    }

    /// A REST attribute's value by its lowercase name.
    pub fn rest_field(&self, name: &str) -> Option<Field> {
        Some(match name {
            "id" => Field::Str(self.id.clone()),
            "name" => Field::Str(self.name.clone()),
            "namespace" => Field::Str(self.namespace.clone()),
            "provider" => Self::text(&self.provider),
            "connection" => Field::Str(self.connection.clone()),
            "externalid" => Self::text(&self.external_id),
            "externalname" => Self::text(&self.external_name),
            "status" => Field::Str(self.status.to_owned()),
            "roles" => Field::List(self.roles.clone()),
            "owner" => Self::text(&self.owner),
            "description" => Self::text(&self.description),
            "createddtm" => Self::time(self.created),
            "lastlogindtm" => Self::time(self.last_used),
            "keyissueddtm" => Self::time(self.key_issued),
            "lastmodifieddtm" => Self::time(self.last_modified),
            "deleted" => Field::Bool(false),
            _ => return None,
        })
    }

    /// A SCIM attribute's value by its lowercase name (core attributes,
    /// `meta.*`, and the extension's, with or without its URN).
    pub fn scim_field(&self, name: &str) -> Option<Field> {
        let extension = format!("{}:", SCIM_EXTENSION.to_ascii_lowercase());
        let name = name.strip_prefix(extension.as_str()).unwrap_or(name);
        Some(match name {
            "id" => Field::Str(self.id.clone()),
            "externalid" => Self::text(&self.external_id),
            "username" => Field::Str(self.name.clone()),
            "displayname" => Field::Str(self.external_name.clone().unwrap_or_else(|| self.name.clone())),
            "active" => Field::Bool(self.status == "Active"),
            "roles" | "roles.value" => Field::List(self.roles.clone()),
            "meta.created" => Self::time(self.created),
            "meta.lastmodified" => Self::time(self.last_modified),
            "meta.resourcetype" => Field::Str("User".to_owned()),
            "namespace" => Field::Str(self.namespace.clone()),
            "provider" => Self::text(&self.provider),
            "connection" => Field::Str(self.connection.clone()),
            "status" => Field::Str(self.status.to_owned()),
            "owner" => Self::text(&self.owner),
            "description" => Self::text(&self.description),
            "lastused" => Self::time(self.last_used),
            "keyissued" => Self::time(self.key_issued),
            _ => return None,
        })
    }
}

/// Which view a query is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `/api/v1/accounts`.
    Rest,
    /// `/scim/v2/Users`.
    Scim,
}

impl View {
    fn field(self, record: &Record, name: &str) -> Option<Field> {
        match self {
            View::Rest => record.rest_field(name),
            View::Scim => record.scim_field(name),
        }
    }

    fn is_date(self, name: &str) -> bool {
        matches!(
            name,
            "createddtm"
                | "lastlogindtm"
                | "keyissueddtm"
                | "lastmodifieddtm"
                | "meta.created"
                | "meta.lastmodified"
                | "lastused"
                | "keyissued"
        ) || name.ends_with(":lastused")
            || name.ends_with(":keyissued")
    }
}

/// The records that match `filter` (parsed and checked for `view`), in id
/// order.
pub fn select<'a>(
    accounts: impl IntoIterator<Item = &'a IntegrationAccount>,
    view: View,
    filter: Option<&str>,
) -> Result<Vec<Record>, String> {
    let filter = filter.filter(|f| !f.trim().is_empty()).map(Filter::parse).transpose()?;
    let probe = Record::probe();
    if let Some(filter) = &filter {
        if let Some(unknown) = filter.attributes().into_iter().find(|a| view.field(&probe, a).is_none()) {
            return Err(format!("{unknown:?} is not an attribute this feed can filter on"));
        }
        filter::check_dates(filter, &|a| view.is_date(a))?;
    }
    let mut records: Vec<Record> = accounts
        .into_iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .map(Record::of)
        .filter(|r| filter.as_ref().is_none_or(|f| f.matches(&|name| view.field(r, name))))
        .collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(records)
}

/// One page of records after the cursor `after` (an id, as the previous
/// page's `next` carries it), and the cursor for the next page if more
/// follow.
pub fn page<'a>(records: &'a [Record], after: Option<&str>, limit: usize) -> (&'a [Record], Option<String>) {
    let start = after.map_or(0, |after| records.partition_point(|r| r.id.as_str() <= after));
    let end = (start + limit.clamp(1, MAX_PAGE)).min(records.len());
    let slice = &records[start..end];
    let next = (end < records.len()).then(|| slice.last().map(|r| r.id.clone())).flatten();
    (slice, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExternalAccount, GrantedRole, IntegrationAccountStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn account(name: &str, uid: &str, provider: Option<&str>, disabled: bool, dormant: bool) -> IntegrationAccount {
        let mut account: IntegrationAccount = serde_json::from_value(json!({
            "apiVersion": "keysmith.dev/v1alpha1",
            "kind": "IntegrationAccount",
            "metadata": {"name": name, "namespace": "monitoring", "uid": uid, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "connectionRef": {"name": "zabbix"},
                "secret": {"name": format!("{name}-secret")},
                "owner": "team-sre",
                "rotationPolicyRef": {"name": "policy"},
            },
        }))
        .unwrap();
        account.status = provider.map(|provider| IntegrationAccountStatus {
            account: Some(ExternalAccount {
                provider: provider.into(),
                id: format!("id-{name}"),
                name: Some(name.into()),
                disabled,
                ..Default::default()
            }),
            roles: vec![GrantedRole { role: "host.get".into(), scope: None }],
            last_used_at: dormant.then(|| Time("2026-02-01T00:00:00Z".parse().unwrap())),
            common: crate::api::CommonStatus {
                conditions: dormant
                    .then(|| Condition {
                        type_: DORMANT.into(),
                        status: "True".into(),
                        reason: "Unused".into(),
                        message: String::new(),
                        observed_generation: None,
                        last_transition_time: Time("2026-03-01T00:00:00Z".parse().unwrap()),
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        });
        account
    }

    fn inventory() -> Vec<IntegrationAccount> {
        vec![
            account("alert-export", "b", Some("zabbix"), false, false),
            account("idle-export", "a", Some("zabbix"), true, true),
            account("new-one", "c", None, false, false),
            account("paused", "d", Some("awsIam"), true, false),
        ]
    }

    #[test]
    fn records_say_state_roles_and_times_and_never_the_secret() {
        let records = select(&inventory(), View::Rest, None).unwrap();
        let states: Vec<(&str, &str)> = records.iter().map(|r| (r.name.as_str(), r.status)).collect();
        assert_eq!(
            states,
            [
                ("monitoring/idle-export", "Dormant"),
                ("monitoring/alert-export", "Active"),
                ("monitoring/new-one", "Pending"),
                ("monitoring/paused", "Disabled")
            ]
        );
        let rest = records[0].rest();
        assert_eq!(rest["lastLoginDtm"], "2026-02-01T00:00:00Z");
        assert_eq!(rest["lastModifiedDtm"], "2026-03-01T00:00:00Z");
        assert_eq!(rest["roles"], json!(["host.get"]));
        let scim = records[1].scim("https://feed/scim/v2/Users");
        assert_eq!(
            (scim["active"].clone(), scim["meta"]["location"].clone()),
            (json!(true), json!("https://feed/scim/v2/Users/b"))
        );
        for record in &records {
            for text in [record.rest().to_string(), record.scim("x").to_string()] {
                assert!(!text.contains("-secret"), "the output Secret's name is not in the feed: {text}");
            }
        }
    }

    #[test]
    fn filters_select_and_unknown_attributes_are_errors() {
        let names = |view, filter: &str| -> Vec<String> {
            select(&inventory(), view, Some(filter)).unwrap().into_iter().map(|r| r.name).collect()
        };
        assert_eq!(names(View::Rest, r#"status eq "Dormant""#), ["monitoring/idle-export"]);
        assert_eq!(names(View::Rest, "not (lastLoginDtm pr)").len(), 3);
        assert_eq!(names(View::Rest, r#"provider eq "zabbix" and status ne "Dormant""#), ["monitoring/alert-export"]);
        assert_eq!(names(View::Scim, "active eq true"), ["monitoring/alert-export"]);
        assert_eq!(names(View::Scim, &format!(r#"{SCIM_EXTENSION}:status eq "Disabled""#)), ["monitoring/paused"]);
        assert_eq!(
            names(View::Scim, r#"roles.value eq "host.get" and userName sw "monitoring/a""#),
            ["monitoring/alert-export"]
        );
        assert!(select(&inventory(), View::Rest, Some(r#"statu eq "x""#)).unwrap_err().contains("statu"));
        assert!(select(&inventory(), View::Scim, Some(r#"meta.created gt "soon""#))
            .unwrap_err()
            .contains("not a date"));
    }

    #[test]
    fn pages_follow_the_cursor_to_the_end() {
        let records = select(&inventory(), View::Rest, None).unwrap();
        let (first, next) = page(&records, None, 3);
        assert_eq!(first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(next.as_deref(), Some("c"));
        let (second, next) = page(&records, Some("c"), 3);
        assert_eq!((second.len(), next), (1, None));
        let (none, next) = page(&records, Some("zzz"), 3);
        assert!(none.is_empty() && next.is_none());
        assert_eq!(page(&records, None, 0).0.len(), 1, "a limit below one is one");
    }
}

//! keysmith: a Kubernetes operator that manages integration identities
//! declaratively. See README.md for the tour.
#![forbid(unsafe_code)]

pub mod api;
pub mod controlplane;
pub mod install;
pub mod provider;

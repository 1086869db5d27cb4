//! keysmith: a Kubernetes operator that manages integration identities
//! declaratively. See README.md for the tour.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod controlplane;
pub mod install;
pub mod manifest;
pub mod policy;
pub mod provider;
pub mod schedule;

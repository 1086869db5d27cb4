//! keysmith: a Kubernetes operator that manages integration identities
//! declaratively. See README.md for the tour.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
#[cfg(feature = "dev")]
pub mod controlplane;
pub mod failpoints;
pub mod feed;
pub mod install;
pub mod leader;
pub mod manifest;
pub mod metrics;
pub mod ownership;
pub mod policy;
pub mod provider;
pub mod schedule;
pub mod server;
pub mod tenancy;

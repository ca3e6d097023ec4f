//! The waypoint controller: provisions the waypoints of our GatewayClass on Kubernetes (owned
//! ServiceAccount, Deployment, Service, PodDisruptionBudget), writes the Gateway API status, and
//! serves each waypoint its own configuration over delta ADS with mTLS.
//!
//! Flow: [`objects`] watches the kinds of [`kinds`] → [`reconcile`] translates them with
//! `common::translate` and splits the result per waypoint ([`scope`]) → [`serve`] streams each
//! waypoint its view; the elected replica ([`leader`]) also applies [`provision`]'s objects and
//! [`status`].

pub mod app;
pub mod config;
pub mod kinds;
pub mod leader;
pub mod objects;
pub mod provision;
pub mod reconcile;
pub mod scope;
pub mod serve;
pub mod status;

//! Vibe: a realtime personal-data backend on PostgreSQL. This library is the server; the `vibe`
//! binary is its command line. See ARCHITECTURE.md for the map.

pub mod app;
pub mod auth;
pub mod config;
pub mod embedded_db;
pub mod feed;
pub mod governance;
pub mod http;
pub mod identity;
pub mod oneshot;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod ws;

pub use vibe_actors::{acl, doc_type, wire};

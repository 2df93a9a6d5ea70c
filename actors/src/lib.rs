//! Vibe's actor tree and the pure cores it drives. Pure modules (`acl`, `doc_type`, `wire`,
//! `change`, `query`, `window`, `call::room`) take time and input as arguments and do no IO; the
//! actors feed them and carry out their outputs (the call room actor owns its UDP socket). IO the actors need (database snapshots) comes in through
//! traits implemented by the server crate.

pub mod acl;
pub mod call;
pub mod certs;
pub mod change;
pub mod doc_type;
pub mod live_query;
pub mod outbox;
pub mod query;
pub mod query_index;
pub mod realtime;
pub mod window;
pub mod wire;

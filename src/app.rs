//! The state every request handler shares: configuration, store, token authority, metrics.

use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::store::Store;

#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub store: Store,
    pub tokens: TokenAuthority,
    pub metrics: PrometheusHandle,
    pub(crate) router: matchit::Router<crate::http::Route>,
}

impl App {
    pub fn new(
        config: Config,
        store: Store,
        tokens: TokenAuthority,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            config,
            store,
            tokens,
            metrics,
            router: crate::http::router(),
        }
    }
}

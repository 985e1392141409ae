//! Where a request for an app goes: the app's socket address.
//!
//! Production derives `[app_ula]:8730` from the app UUID with the shared function in
//! `tabbify_control::ula`, so the edge and the supervisor agree with no lookup. Tests and the
//! benchmark replace it with loopback addresses; nothing else in the edge knows the difference.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;

use tabbify_control::ula::{app_ula, APP_PORT};
use uuid::Uuid;

/// Resolves an app UUID to the address of its runner.
#[derive(Clone, Debug, Default)]
pub enum Upstream {
    /// `[app_ula(uuid)]:8730`, reached through the mesh (production).
    #[default]
    AppUla,
    /// Every app at one address (the hidden `--upstream-override`, for benchmarks and tests).
    Fixed(SocketAddr),
    /// A fixed table of apps; an app missing from it is unreachable (tests with several apps).
    Table(Arc<HashMap<Uuid, SocketAddr>>),
}

impl Upstream {
    /// The address of `app`'s runner, or `None` when this resolver knows no such app.
    pub fn resolve(&self, app: &Uuid) -> Option<SocketAddr> {
        match self {
            Upstream::AppUla => Some(SocketAddr::V6(SocketAddrV6::new(
                app_ula(app),
                APP_PORT,
                0,
                0,
            ))),
            Upstream::Fixed(addr) => Some(*addr),
            Upstream::Table(table) => table.get(app).copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_form_is_the_shared_app_ula_on_port_8730() {
        let app = Uuid::parse_str("7c9e6679-7425-40de-944b-e07fc1f90ae7").unwrap();
        let addr = Upstream::AppUla.resolve(&app).unwrap();
        assert_eq!(addr.port(), 8730);
        assert_eq!(addr.ip(), std::net::IpAddr::V6(app_ula(&app)));
        assert!(tabbify_control::ula::is_app_ula(&app_ula(&app)));
    }

    #[test]
    fn table_form_misses_unknown_apps() {
        let known = Uuid::from_u128(1);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let up = Upstream::Table(Arc::new(HashMap::from([(known, addr)])));
        assert_eq!(up.resolve(&known), Some(addr));
        assert_eq!(up.resolve(&Uuid::from_u128(2)), None);
    }
}

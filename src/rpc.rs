//! The RPCs of `SessionCache`, in one table: the name metrics and traces give each, the
//! role it needs, and the outcomes it answers with. The auth gate, the service's one
//! call path and the metrics all read this table, so an RPC cannot be half added.

use crate::auth::Role;

/// One `SessionCache` RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    Get,
    Set,
    InvalidateToken,
    InvalidateUser,
    Health,
    Validate,
    /// `envoy.service.auth.v3.Authorization/Check` (SPEC §11).
    Check,
}

/// The gRPC service name, as `rpc.service` in traces.
pub const SERVICE: &str = "sessioncache.v1.SessionCache";

/// Envoy's external authorization service, which `Check` belongs to.
pub const ENVOY_AUTHORIZATION: &str = "envoy.service.auth.v3.Authorization";

/// The `outcome` label of a call the service refused, whatever the RPC: its gRPC code
/// (see `metrics::code_label`).
pub const REFUSALS: [&str; 7] = [
    "invalid_argument",
    "failed_precondition",
    "unauthenticated",
    "permission_denied",
    "resource_exhausted",
    "unavailable_status",
    "other_error",
];

impl Rpc {
    pub const ALL: [Rpc; 7] = [
        Rpc::Get,
        Rpc::Set,
        Rpc::InvalidateToken,
        Rpc::InvalidateUser,
        Rpc::Health,
        Rpc::Validate,
        Rpc::Check,
    ];

    /// The gRPC service the RPC belongs to, as `rpc.service` in traces.
    pub fn service(self) -> &'static str {
        match self {
            Rpc::Check => ENVOY_AUTHORIZATION,
            _ => SERVICE,
        }
    }

    /// The RPC a gRPC method name (the last segment of the path) stands for.
    pub fn from_method(method: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|rpc| rpc.name() == method)
    }

    /// The method name, as the `rpc` metric label and `rpc.method` in traces.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Get => "Get",
            Rpc::Set => "Set",
            Rpc::InvalidateToken => "InvalidateToken",
            Rpc::InvalidateUser => "InvalidateUser",
            Rpc::Health => "Health",
            Rpc::Validate => "Validate",
            Rpc::Check => "Check",
        }
    }

    /// The full method name, `sessioncache.v1.SessionCache/Get`: a server span's name
    /// under OpenTelemetry's RPC conventions.
    pub fn path(self) -> &'static str {
        match self {
            Rpc::Get => "sessioncache.v1.SessionCache/Get",
            Rpc::Set => "sessioncache.v1.SessionCache/Set",
            Rpc::InvalidateToken => "sessioncache.v1.SessionCache/InvalidateToken",
            Rpc::InvalidateUser => "sessioncache.v1.SessionCache/InvalidateUser",
            Rpc::Health => "sessioncache.v1.SessionCache/Health",
            Rpc::Validate => "sessioncache.v1.SessionCache/Validate",
            Rpc::Check => "envoy.service.auth.v3.Authorization/Check",
        }
    }

    /// The role a caller needs (SPEC §7, §9, §11): readers may look up, writers may
    /// also write. Validate and Check are a reader's: what they cache comes from the
    /// identity provider, never from the caller.
    pub fn role(self) -> Role {
        match self {
            Rpc::Get | Rpc::Health | Rpc::Validate | Rpc::Check => Role::Reader,
            Rpc::Set | Rpc::InvalidateToken | Rpc::InvalidateUser => Role::Writer,
        }
    }

    /// The `outcome` labels of its answered calls (refusals are in [`REFUSALS`]).
    pub fn outcomes(self) -> &'static [&'static str] {
        match self {
            Rpc::Get => &[
                "hit",
                "miss",
                "expired",
                "invalidated",
                "corrupt",
                "disabled",
                "unavailable",
            ],
            Rpc::Set => &[
                "stored",
                "disabled",
                "unavailable",
                "expired",
                "stale",
                "revoked",
            ],
            Rpc::InvalidateToken | Rpc::InvalidateUser | Rpc::Health => &["ok"],
            Rpc::Validate => &["valid", "invalid", "unavailable"],
            // UNAVAILABLE is a gRPC status for Check: `unavailable_status`.
            Rpc::Check => &["allowed", "denied"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for rpc in Rpc::ALL {
            assert_eq!(Rpc::from_method(rpc.name()), Some(rpc));
            assert_eq!(rpc.path(), format!("{}/{}", rpc.service(), rpc.name()));
        }
        assert_eq!(Rpc::from_method("Watch"), None);
    }
}

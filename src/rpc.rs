//! Every gRPC method the server hosts, in one table: its path, the name metrics and
//! traces give it, who may call it, and the outcomes it answers with. The call layer
//! (`crate::call`) derives each call's method from its path through this table and
//! refuses a method the table does not know; the metrics export every row from start-up.
//! A method cannot be half added: without a row it cannot be called at all.

use std::{fmt, time::Duration};

use serde::Deserialize;
use tonic::Code;

use crate::pb::{GetOutcome, SetOutcome, ValidateOutcome};

/// The `sessioncache.v1` service's name, as `rpc.service` in traces and its
/// `grpc.health.v1` status name.
pub const SESSION_CACHE: &str = "sessioncache.v1.SessionCache";
/// The services whose `grpc.health.v1` status follows the store (SPEC §5, §11):
/// NOT_SERVING until the first successful ping, then whatever the last one found.
pub const STORE_BACKED: &[&str] = &[SESSION_CACHE, ENVOY_AUTHORIZATION];
/// Envoy's external authorization service (SPEC §11), which `Check` belongs to.
pub const ENVOY_AUTHORIZATION: &str = "envoy.service.auth.v3.Authorization";
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Get, Validate, Health: what reads the cache or asks the identity provider.
    Reader,
    /// Everything a reader may, plus Set, InvalidateToken and InvalidateUser.
    Writer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
        })
    }
}

/// Who may call a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health probes and reflection need no credentials (SPEC §7).
    Open,
    /// A caller holding this role, when callers are authenticated at all.
    Role(Role),
}

/// One gRPC method the server hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    Get,
    Set,
    InvalidateToken,
    InvalidateUser,
    Health,
    Validate,
    /// `grpc.health.v1.Health/Check`.
    HealthCheck,
    /// `grpc.health.v1.Health/Watch`.
    HealthWatch,
    /// `ServerReflectionInfo` of reflection v1.
    Reflection,
    /// `ServerReflectionInfo` of reflection v1alpha.
    ReflectionV1Alpha,
    /// `envoy.service.auth.v3.Authorization/Check` (SPEC §11).
    Check,
}

impl Rpc {
    pub const ALL: [Rpc; 11] = [
        Rpc::Get,
        Rpc::Set,
        Rpc::InvalidateToken,
        Rpc::InvalidateUser,
        Rpc::Health,
        Rpc::Validate,
        Rpc::HealthCheck,
        Rpc::HealthWatch,
        Rpc::Reflection,
        Rpc::ReflectionV1Alpha,
        Rpc::Check,
    ];

    /// The method a request path (`/sessioncache.v1.SessionCache/Get`) names; `None`
    /// for any path the table does not list.
    pub fn from_path(path: &str) -> Option<Rpc> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        Rpc::ALL
            .into_iter()
            .find(|rpc| rpc.service() == service && rpc.method() == method)
    }

    /// The gRPC service, as `rpc.service` in traces.
    pub fn service(self) -> &'static str {
        match self {
            Rpc::Get
            | Rpc::Set
            | Rpc::InvalidateToken
            | Rpc::InvalidateUser
            | Rpc::Health
            | Rpc::Validate => SESSION_CACHE,
            Rpc::HealthCheck | Rpc::HealthWatch => HEALTH,
            Rpc::Reflection => REFLECTION_V1,
            Rpc::ReflectionV1Alpha => REFLECTION_V1ALPHA,
            Rpc::Check => ENVOY_AUTHORIZATION,
        }
    }

    /// The method's name within its service, as `rpc.method` in traces.
    pub fn method(self) -> &'static str {
        match self {
            Rpc::Get => "Get",
            Rpc::Set => "Set",
            Rpc::InvalidateToken => "InvalidateToken",
            Rpc::InvalidateUser => "InvalidateUser",
            Rpc::Health => "Health",
            Rpc::Validate => "Validate",
            Rpc::HealthCheck | Rpc::Check => "Check",
            Rpc::HealthWatch => "Watch",
            Rpc::Reflection | Rpc::ReflectionV1Alpha => "ServerReflectionInfo",
        }
    }

    /// The `rpc` metric label: the method's name for the service's own methods, a name
    /// of its own for each of the others.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::HealthCheck => "HealthCheck",
            Rpc::HealthWatch => "HealthWatch",
            Rpc::Reflection => "ServerReflectionInfo",
            Rpc::ReflectionV1Alpha => "ServerReflectionInfoV1Alpha",
            rpc => rpc.method(),
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
            Rpc::HealthCheck => "grpc.health.v1.Health/Check",
            Rpc::HealthWatch => "grpc.health.v1.Health/Watch",
            Rpc::Reflection => "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Rpc::ReflectionV1Alpha => {
                "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            }
            Rpc::Check => "envoy.service.auth.v3.Authorization/Check",
        }
    }

    /// Who may call it (SPEC §7, §9, §11): readers may look up, writers may also write.
    /// Validate and Check are a reader's: what they cache comes from the identity
    /// provider, never from the caller.
    pub fn access(self) -> Access {
        match self {
            Rpc::Get | Rpc::Health | Rpc::Validate | Rpc::Check => Access::Role(Role::Reader),
            Rpc::Set | Rpc::InvalidateToken | Rpc::InvalidateUser => Access::Role(Role::Writer),
            Rpc::HealthCheck | Rpc::HealthWatch | Rpc::Reflection | Rpc::ReflectionV1Alpha => {
                Access::Open
            }
        }
    }

    /// Whether a call takes one of the `--max-in-flight` slots: the service's own
    /// methods do; probes and reflection are never shed.
    pub fn admitted(self) -> bool {
        matches!(self.access(), Access::Role(_))
    }

    /// Whether its answer is a stream that may rightly stay open (health Watch,
    /// reflection) rather than one message that must be delivered and read.
    pub fn long_lived(self) -> bool {
        matches!(
            self,
            Rpc::HealthWatch | Rpc::Reflection | Rpc::ReflectionV1Alpha
        )
    }

    /// The `outcome` labels of its answered calls (the others are [`ENDINGS`]).
    pub fn outcomes(self) -> Vec<&'static str> {
        /// Every value of a protobuf enum but the unspecified 0.
        fn values<E: TryFrom<i32>>(label: fn(E) -> &'static str) -> Vec<&'static str> {
            (1..)
                .map_while(|i| E::try_from(i).ok())
                .map(label)
                .collect()
        }
        match self {
            Rpc::Get => values(get_label),
            Rpc::Set => values(set_label),
            Rpc::Validate => values(validate_label),
            // Allowed or denied; UNAVAILABLE is a gRPC status (`unavailable_status`).
            Rpc::Check => CHECK_OUTCOMES.to_vec(),
            _ => vec![OK],
        }
    }
}

/// The `outcome` labels of an answered Check.
pub const CHECK_OUTCOMES: [&str; 2] = ["allowed", "denied"];

/// The `outcome` of an answered call that has no outcome of its own.
pub const OK: &str = "ok";

/// The outcome an answered call reports to the call layer (in its response's
/// extensions): the `outcome` metric label and span attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

/// The `outcome` label of a Get.
pub fn get_label(outcome: GetOutcome) -> &'static str {
    match outcome {
        GetOutcome::Hit => "hit",
        GetOutcome::Miss => "miss",
        GetOutcome::Expired => "expired",
        GetOutcome::Invalidated => "invalidated",
        GetOutcome::Corrupt => "corrupt",
        GetOutcome::Disabled => "disabled",
        GetOutcome::Unavailable => "unavailable",
        GetOutcome::Unspecified => "unspecified",
    }
}

/// The `outcome` label of a Set.
pub fn set_label(outcome: SetOutcome) -> &'static str {
    match outcome {
        SetOutcome::Stored => "stored",
        SetOutcome::Disabled => "disabled",
        SetOutcome::Unavailable => "unavailable",
        SetOutcome::Expired => "expired",
        SetOutcome::Stale => "stale",
        SetOutcome::Revoked => "revoked",
        SetOutcome::Unspecified => "unspecified",
    }
}

/// The `outcome` label of a Validate.
pub fn validate_label(outcome: ValidateOutcome) -> &'static str {
    match outcome {
        ValidateOutcome::Valid => "valid",
        ValidateOutcome::Invalid => "invalid",
        ValidateOutcome::Unavailable => "unavailable",
        ValidateOutcome::Unspecified => "unspecified",
    }
}

/// The `outcome` of a call that ended with a gRPC error, by its code.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable_status",
        Code::Unimplemented => "unimplemented",
        _ => "other_error",
    }
}

/// The `outcome` of a call dropped before it was answered because the client went
/// away (reset its stream, closed its connection).
pub const CANCELLED: &str = "cancelled";
/// The `outcome` of a call cut by the request timeout (`--request-timeout-ms`, or the
/// client's shorter `grpc-timeout`).
pub const TIMED_OUT: &str = "timeout";

/// The `outcome` labels any call may end with besides its answers: refused with a gRPC
/// code, cancelled, or timed out.
pub const ENDINGS: [&str; 10] = [
    "invalid_argument",
    "failed_precondition",
    "unauthenticated",
    "permission_denied",
    "resource_exhausted",
    "unavailable_status",
    "unimplemented",
    "other_error",
    CANCELLED,
    TIMED_OUT,
];

/// The `rpc` label of a call to a path the table does not know.
pub const UNKNOWN: &str = "unknown";

/// The `grpc-timeout` a gRPC client sent (`<up to 8 digits><H|M|S|m|u|n>`), if any
/// and well formed.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC's timeout header in each unit, and malformed ones ignored.
    #[test]
    fn reads_grpc_timeout() {
        let parse = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    /// Each row's path is its service and method, and reads back to the row; nothing
    /// else does.
    #[test]
    fn paths_round_trip() {
        for rpc in Rpc::ALL {
            assert_eq!(rpc.path(), format!("{}/{}", rpc.service(), rpc.method()));
            assert_eq!(Rpc::from_path(&format!("/{}", rpc.path())), Some(rpc));
        }
        assert_eq!(Rpc::from_path("/sessioncache.v1.SessionCache/Watch"), None);
        assert_eq!(Rpc::from_path("sessioncache.v1.SessionCache/Get"), None);
        assert_eq!(Rpc::from_path("/other.Service/Get"), None);
    }

    /// Metric labels tell every row apart.
    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = Rpc::ALL.iter().map(|rpc| rpc.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Rpc::ALL.len());
    }

    /// Every code a refusal can carry has a label of [`ENDINGS`].
    #[test]
    fn code_labels_are_endings() {
        for code in 0..=16 {
            let label = code_label(Code::from_i32(code));
            assert!(ENDINGS.contains(&label), "{label}");
        }
        assert_eq!(Rpc::Get.outcomes().len(), 7);
        assert!(!Rpc::Get.outcomes().contains(&"unspecified"));
    }
}

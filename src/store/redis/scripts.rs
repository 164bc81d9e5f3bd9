//! The store's Lua scripts (`scripts/*.lua`, each behind `scripts/lib.lua` and a
//! shebang), and how a script call is sent: as `EVALSHA`, loading the script where
//! Redis has lost it (`NOSCRIPT` after a restart, a failover or `SCRIPT FLUSH`).

use std::sync::Arc;

use bb8_redis::redis::{self, Cmd, ErrorKind, Script, ScriptInvocation, ServerErrorKind, Value};

use super::connection::{Conn, Handle};
use crate::store::StoreError;

/// The store's scripts, each with the shebang that keeps it off replicas.
pub(super) struct Scripts {
    pub get: Script,
    pub set: Arc<Lua>,
    pub invalidate_token: Arc<Lua>,
    pub invalidate_user: Arc<Lua>,
    pub remove_if: Script,
    pub ping: Lua,
}

/// A script with its text, for where it goes as `EVAL`: inside the pipeline of a
/// revocation that waits for replicas, where a primary that lost its script cache (a
/// failover) could not be answered `NOSCRIPT` and retried, and to every Cluster primary
/// at once for a ping; and for `SCRIPT LOAD` where a batched call is answered
/// `NOSCRIPT`.
pub(super) struct Lua {
    pub script: Script,
    pub code: String,
}

impl Lua {
    pub(super) fn new(code: String) -> Self {
        Lua {
            script: Script::new(&code),
            code,
        }
    }

    /// `EVAL` of this script with these keys and arguments.
    pub(super) fn eval(&self, keys: &[String], args: &[String]) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&self.code).arg(keys.len()).arg(keys).arg(args);
        cmd
    }

    /// `EVALSHA` of this script with these keys and arguments, as a command of its own
    /// (for the coalescer; see [`evalsha`] for the `NOSCRIPT` that may answer it).
    pub(super) fn evalsha(&self, keys: &[String], args: &[String]) -> Cmd {
        let mut cmd = self.evalsha_of(keys.len());
        cmd.arg(keys).arg(args);
        cmd
    }

    /// `EVALSHA` of this script, to be given its `keys` keys and then its arguments.
    pub(super) fn evalsha_of(&self, keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys);
        cmd
    }

    /// `EVALSHA` of this script, loading it where it is missing.
    pub(super) fn invocation(&self, keys: &[String], args: &[String]) -> ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        invocation
    }
}

/// The first line of every script. A script with a shebang and without the `no-writes`
/// flag is one that Redis (7.0 and later) refuses on a replica (`READONLY`) and on a
/// primary short of `min-replicas-to-write` (`NOREPLICAS`): so no call, not even a
/// lookup, is ever served by a demoted primary or a replica, whatever this process
/// believes about where the primary is. `allow-oom` lets the scripts that only read or
/// delete run on a full Redis,; Set and the revocations leave it
/// off, and a full Redis refuses them (under `noeviction`) before they run.
const SHEBANG: &str = "#!lua\n";
const SHEBANG_ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

macro_rules! lua {
    ($shebang:expr, $file:literal) => {
        [
            $shebang,
            include_str!("scripts/lib.lua"),
            include_str!(concat!("scripts/", $file)),
        ]
        .concat()
    };
}

macro_rules! script {
    ($shebang:expr, $file:literal) => {
        Script::new(&lua!($shebang, $file))
    };
}

/// The Get script's argument that has it read the marker in the same round trip
/// (outside Cluster only; see `scripts/get.lua`).
pub(super) const READ_MARKER: &str = "marker";

impl Scripts {
    /// Every script, ready to send.
    pub(super) fn new() -> Scripts {
        Scripts {
            get: script!(SHEBANG_ALLOW_OOM, "get.lua"),
            set: Arc::new(Lua::new(lua!(SHEBANG, "set.lua"))),
            invalidate_token: Arc::new(Lua::new(lua!(SHEBANG, "invalidate_token.lua"))),
            invalidate_user: Arc::new(Lua::new(lua!(SHEBANG, "invalidate_user.lua"))),
            remove_if: script!(SHEBANG_ALLOW_OOM, "remove_if.lua"),
            ping: Lua::new(lua!(SHEBANG_ALLOW_OOM, "ping.lua")),
        }
    }
}

/// Runs one script call (`cmd`, an `EVALSHA` of `script`) on `handle`.
pub(super) async fn evalsha(handle: &Handle, script: &Lua, cmd: &Cmd) -> Result<Value, StoreError> {
    let mut conn = handle.conn.clone();
    match cmd.query_async::<Value>(&mut conn).await {
        Ok(Value::ServerError(e)) if e.kind() == Some(ServerErrorKind::NoScript) => {
            reload(handle, &mut conn, script, cmd).await
        }
        Ok(Value::ServerError(e)) => Err(handle.failed(e.into())),
        Ok(value) => Ok(value),
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            reload(handle, &mut conn, script, cmd).await
        }
        Err(e) => Err(handle.failed(e)),
    }
}

/// Loads `script` and sends `cmd` again.
async fn reload(
    handle: &Handle,
    conn: &mut Conn,
    script: &Lua,
    cmd: &Cmd,
) -> Result<Value, StoreError> {
    script
        .script
        .load_async(conn)
        .await
        .map_err(|e| handle.failed(e))?;
    match cmd.query_async::<Value>(conn).await {
        Ok(Value::ServerError(e)) => Err(handle.failed(e.into())),
        Ok(value) => Ok(value),
        Err(e) => Err(handle.failed(e)),
    }
}

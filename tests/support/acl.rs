//! The Redis ACL users that `docs/OPERATIONS.md` documents, one per topology, read from
//! that document and set on the test's own nodes, so that a test runs the service as
//! the user an operator creates from the document, and the documented text cannot
//! drift from what the tests prove.
//!
//! Each user is a fenced block preceded by `<!-- acl:NAME -->`, holding one ACL file
//! line, `user NAME on >PASSWORD rules...`. `PASSWORD` is the placeholder an operator
//! replaces; the tests put [`PASSWORD`] in its place. The rules are set with
//! `ACL SETUSER` on every node of the running topology (an ACL file line and
//! `ACL SETUSER` take the same rules), while the default user stays open for the
//! test's own looks at the nodes.

use std::path::PathBuf;

use bb8_redis::redis;

use super::{
    Backend, Harness, Redis,
    cluster::{Cluster, ClusterTopology},
    pki::Dir,
    sentinel::{SentinelTopology, Topology},
};

/// The password the tests give every documented user.
pub const PASSWORD: &str = "acl-test-pass-5e81c2";

/// The document the users are read from.
pub fn document() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md")
}

/// One documented ACL user: its name and its rules, the password set to [`PASSWORD`].
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub rules: Vec<String>,
}

/// The user documented under `<!-- acl:{which} -->`; panics, naming the document, when
/// there is none or it is not one `user NAME on >PASSWORD ...` line.
pub fn documented(which: &str) -> User {
    let path = document();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} cannot be read: {e}", path.display()));
    let marker = format!("<!-- acl:{which} -->");
    let after = text
        .split_once(&marker)
        .unwrap_or_else(|| panic!("{} has no {marker}", path.display()))
        .1;
    let mut lines = after.lines().skip_while(|l| l.trim().is_empty());
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "{}: {marker} must be followed by a fenced block, found {fence:?}",
        path.display()
    );
    let body: Vec<&str> = lines
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    assert_eq!(
        body.len(),
        1,
        "{}: the block after {marker} must hold one ACL line, found {body:?}",
        path.display()
    );
    let words: Vec<&str> = body[0].split_whitespace().collect();
    assert!(
        words.len() > 3 && words[0] == "user" && words.contains(&">PASSWORD"),
        "{}: the block after {marker} must read `user NAME ... >PASSWORD ...`, found {:?}",
        path.display(),
        body[0]
    );
    User {
        name: words[1].to_owned(),
        rules: words[2..]
            .iter()
            .map(|w| {
                if *w == ">PASSWORD" {
                    format!(">{PASSWORD}")
                } else {
                    (*w).to_owned()
                }
            })
            .collect(),
    }
}

impl User {
    /// `ACL SETUSER` of this user on the node at `port`, as its default user.
    pub async fn set_on(&self, port: u16) {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("node {port} answers: {e}"));
        let mut setuser = redis::cmd("ACL");
        setuser.arg("SETUSER").arg(&self.name).arg("reset");
        for rule in &self.rules {
            setuser.arg(rule);
        }
        let done: redis::RedisResult<String> = setuser.query_async(&mut conn).await;
        if let Err(e) = done {
            panic!("ACL SETUSER {} {:?} on {port}: {e}", self.name, self.rules);
        }
    }

    /// A password file for this user in `dir`; returns its path.
    pub fn password_file(&self, dir: &Dir) -> String {
        dir.write(&format!("{}.password", self.name), format!("{PASSWORD}\n"))
    }
}

/// Starts `backend`'s store with its documented ACL users set on every node, then the
/// server over it with `args`, connecting as those users, and waits until serving.
/// The memory store has no users: it starts as [`Harness::start`] does.
pub async fn harness(backend: Backend, args: &[&str]) -> Harness {
    // The password files are read before the server starts; dropping them after is fine.
    let dir = Dir::new();
    let mut argv: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let with = |argv: &mut Vec<String>, flag: &str, value: String| {
        argv.push(flag.to_owned());
        argv.push(value);
    };
    match backend {
        Backend::Memory => Harness::start(backend, args).await,
        Backend::Redis => {
            let redis = Redis::start().await;
            let user = documented("redis");
            user.set_on(redis.port()).await;
            with(&mut argv, "--redis-username", user.name.clone());
            with(&mut argv, "--redis-password-file", user.password_file(&dir));
            Harness::over(Some(redis), &refs(&argv)).await
        }
        Backend::Sentinel => {
            let topology = SentinelTopology::start(Topology::default()).await;
            let data = documented("sentinel-data");
            for port in topology.data_ports() {
                data.set_on(port).await;
            }
            let sentinel = documented("sentinel");
            for port in topology.sentinel_ports() {
                sentinel.set_on(port).await;
            }
            with(&mut argv, "--redis-username", data.name.clone());
            with(&mut argv, "--redis-password-file", data.password_file(&dir));
            with(
                &mut argv,
                "--redis-sentinel-username",
                sentinel.name.clone(),
            );
            with(
                &mut argv,
                "--redis-sentinel-password-file",
                sentinel.password_file(&dir),
            );
            let mut harness = Harness::over_sentinels(&topology, &refs(&argv)).await;
            harness.sentinel = Some(topology);
            harness
        }
        Backend::Cluster => {
            let topology = ClusterTopology::start(Cluster {
                primaries: 3,
                replicas_per_primary: 1,
            })
            .await;
            let user = documented("cluster");
            for port in topology.ports() {
                user.set_on(port).await;
            }
            with(&mut argv, "--redis-username", user.name.clone());
            with(&mut argv, "--redis-password-file", user.password_file(&dir));
            let mut harness = Harness::over_cluster(&topology, &refs(&argv)).await;
            harness.cluster = Some(topology);
            harness
        }
    }
}

fn refs(argv: &[String]) -> Vec<&str> {
    argv.iter().map(String::as_str).collect()
}

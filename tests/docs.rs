//! The documents hold what the code does, at every point that can drift: every flag of
//! `--help` with its variable and default in `docs/CONFIGURATION.md`; Health's `store`
//! values in the proto, `docs/API.md` and `docs/SPEC.md`; the `outcome` labels of
//! `session_cache_calls_total` in `docs/METRICS.md`; the roles in `docs/SECURITY.md`,
//! `docs/API.md` and `docs/SPEC.md`; the alert list of `deploy/README.md` against
//! `deploy/prometheus/alerts.yml`; the Secrets the Kubernetes steps create against
//! those the manifests mount. Each failure names the document and what differs in it.

mod support;

use std::{collections::BTreeMap, path::Path, process::Command};

use session_cache::rpc::{Access, ENDINGS, Rpc};
use support::Backend;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The text between backquotes in `text`, in order.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// One flag as `--help` shows it: its variable and its default, if any.
#[derive(Debug, PartialEq, Eq)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// Every flag of the binary's `--help`.
fn help_flags() -> BTreeMap<String, Flag> {
    let output = Command::new(env!("CARGO_BIN_EXE_session-cache"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("session-cache --help runs");
    assert!(output.status.success(), "--help exits 0");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--")
            && line.starts_with("      --")
        {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if name == "help" || name == "version" {
                current = None;
                continue;
            }
            let name = format!("--{name}");
            flags.insert(
                name.clone(),
                Flag {
                    env: None,
                    default: None,
                },
            );
            current = Some(name);
        } else if let Some(name) = &current {
            let flag = flags.get_mut(name).unwrap();
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                flag.env = Some(env.trim_end_matches(']').split('=').next().unwrap().into());
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                flag.default = Some(default.trim_end_matches(']').into());
            }
        }
    }
    assert!(flags.len() > 40, "--help was parsed: {flags:?}");
    flags
}

/// Every row of the flag table of docs/CONFIGURATION.md: the flag, its variable, and
/// its default when written as code (a default in words is chosen at start-up).
fn documented_flags() -> BTreeMap<String, Flag> {
    let text = read("docs/CONFIGURATION.md");
    let mut flags = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(
            cells.len(),
            4,
            "docs/CONFIGURATION.md: a row must be | flag | environment | default | what |: {line}"
        );
        let flag = code_spans(cells[0]);
        assert_eq!(
            flag.len(),
            1,
            "docs/CONFIGURATION.md: one flag per row: {line}"
        );
        let env = code_spans(cells[1]).first().map(|s| (*s).to_owned());
        let default = cells[2]
            .starts_with('`')
            .then(|| code_spans(cells[2])[0].to_owned());
        let previous = flags.insert(flag[0].to_owned(), Flag { env, default });
        assert!(
            previous.is_none(),
            "docs/CONFIGURATION.md lists {} twice",
            flag[0]
        );
    }
    flags
}

/// docs/CONFIGURATION.md lists exactly the flags of `--help`, each with the same
/// environment variable and the same default.
#[test]
fn configuration_document_matches_help() {
    let help = help_flags();
    let documented = documented_flags();
    let mut differences = Vec::new();
    for (name, flag) in &help {
        match documented.get(name) {
            None => differences.push(format!(
                "{name} (env {:?}, default {:?}) is in --help but not in docs/CONFIGURATION.md",
                flag.env, flag.default
            )),
            Some(doc) if doc.env != flag.env => differences.push(format!(
                "{name}: docs/CONFIGURATION.md gives the variable {:?}, --help {:?}",
                doc.env, flag.env
            )),
            Some(doc) if doc.default != flag.default => differences.push(format!(
                "{name}: docs/CONFIGURATION.md gives the default {:?}, --help {:?} \
                 (write a default as code only when --help shows it)",
                doc.default, flag.default
            )),
            Some(_) => {}
        }
    }
    for name in documented.keys().filter(|name| !help.contains_key(*name)) {
        differences.push(format!(
            "{name} is in docs/CONFIGURATION.md but not in --help"
        ));
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Health's `store` values, as the conformance suite sees each topology answer them.
fn store_values() -> Vec<&'static str> {
    [
        Backend::Memory,
        Backend::Redis,
        Backend::Sentinel,
        Backend::Cluster,
    ]
    .map(Backend::store_name)
    .to_vec()
}

/// The proto comment, docs/API.md's Health row and docs/SPEC.md name every value of
/// `HealthResponse.store`, each quoted as the reader will see it.
#[test]
fn health_store_values_agree() {
    let proto = read("proto/sessioncache/v1/session_cache.proto");
    let comment = proto
        .lines()
        .skip_while(|l| !l.contains("Which store holds the sessions"))
        .take_while(|l| l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    let api = read("docs/API.md");
    let row = api
        .lines()
        .find(|l| l.starts_with("| `Health()`"))
        .expect("docs/API.md has a Health() row");
    let spec = read("docs/SPEC.md");
    let mut missing = Vec::new();
    for store in store_values() {
        if !comment.contains(&format!("\"{store}\"")) {
            missing.push(format!(
                "the proto's HealthResponse.store comment lacks \"{store}\""
            ));
        }
        if !code_spans(row).contains(&store) {
            missing.push(format!("docs/API.md's Health() row lacks `{store}`"));
        }
        if store != "memory" && !spec.contains(&format!("`{store}`")) {
            missing.push(format!("docs/SPEC.md lacks `{store}`"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The `outcome` labels docs/METRICS.md gives `session_cache_calls_total` are exactly
/// those the code counts: every RPC's answers and every refusal.
#[test]
fn outcome_labels_agree() {
    let metrics = read("docs/METRICS.md");
    let row = metrics
        .lines()
        .find(|l| l.starts_with("| `session_cache_calls_total`"))
        .expect("docs/METRICS.md has a session_cache_calls_total row");
    let outcomes = row
        .split_once("`outcome`")
        .expect("the row names the outcome label")
        .1;
    let mut documented: Vec<&str> = code_spans(outcomes);
    documented.sort_unstable();
    documented.dedup();
    let mut counted: Vec<&str> = Rpc::ALL
        .iter()
        .flat_map(|rpc| rpc.outcomes())
        .chain(ENDINGS)
        .collect();
    counted.sort_unstable();
    counted.dedup();
    let missing: Vec<_> = counted.iter().filter(|o| !documented.contains(o)).collect();
    let extra: Vec<_> = documented.iter().filter(|o| !counted.contains(o)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/METRICS.md's outcome labels: missing {missing:?}, not counted by the code {extra:?}"
    );
    let rpcs = code_spans(row.split_once("`outcome`").unwrap().0);
    for rpc in Rpc::ALL {
        assert!(
            rpcs.contains(&rpc.name()),
            "docs/METRICS.md's rpc label lacks `{}`",
            rpc.name()
        );
    }
}

/// Which role each RPC needs, as docs/SECURITY.md's table, docs/API.md's RPC table and
/// docs/SPEC.md §7 say, against the RPC table the auth gate reads.
#[test]
fn roles_agree() {
    // The methods that need a role; health and reflection need none.
    let roles: Vec<(Rpc, String)> = Rpc::ALL
        .into_iter()
        .filter_map(|rpc| match rpc.access() {
            Access::Role(role) => Some((rpc, role.to_string())),
            Access::Open => None,
        })
        .collect();
    let named = |want: &str| -> Vec<&str> {
        roles
            .iter()
            .filter(|(_, role)| role == want)
            .map(|(rpc, _)| rpc.name())
            .collect()
    };
    let readers = named("reader");
    let writers_only = named("writer");
    let mut wrong = Vec::new();

    let security = read("docs/SECURITY.md");
    for (role, want) in [("reader", &readers), ("writer", &writers_only)] {
        let row = security
            .lines()
            .find(|l| l.starts_with(&format!("| `{role}` |")))
            .unwrap_or_else(|| panic!("docs/SECURITY.md has no `{role}` row"));
        let mut named: Vec<&str> = code_spans(row).into_iter().skip(1).collect();
        named.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        if named != want {
            wrong.push(format!(
                "docs/SECURITY.md: `{role}` may call {named:?}, the code says {want:?}"
            ));
        }
    }

    let api = read("docs/API.md");
    for (rpc, role) in &roles {
        let row = api
            .lines()
            .find(|l| l.starts_with(&format!("| `{}(", rpc.name())))
            .unwrap_or_else(|| panic!("docs/API.md has no row for {}", rpc.name()));
        if code_spans(row).get(1) != Some(&role.as_str()) {
            wrong.push(format!("docs/API.md: {} needs `{role}`: {row}", rpc.name()));
        }
    }

    let spec = read("docs/SPEC.md");
    let line = spec
        .lines()
        .find(|l| l.starts_with("- Roles: `reader` calls"))
        .expect("docs/SPEC.md §7 has the roles line");
    let reader_part = line.split("`writer`").next().unwrap();
    for rpc in &readers {
        if !reader_part.contains(rpc) {
            wrong.push(format!("docs/SPEC.md §7: `reader` lacks {rpc}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// deploy/README.md names every alert of deploy/prometheus/alerts.yml, and no other.
#[test]
fn deploy_readme_lists_every_alert() {
    let rules = read("deploy/prometheus/alerts.yml");
    let mut defined: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    defined.sort_unstable();
    let readme = read("deploy/README.md");
    let mut listed: Vec<&str> = code_spans(&readme)
        .into_iter()
        .filter(|s| s.starts_with("SessionCache") && !s.contains(' '))
        .collect();
    listed.sort_unstable();
    listed.dedup();
    assert!(!defined.is_empty(), "alerts.yml defines alerts");
    assert_eq!(
        listed, defined,
        "deploy/README.md's alert list against deploy/prometheus/alerts.yml"
    );
}

/// Every Secret the Kubernetes manifests mount or read is created by deploy/README.md's
/// `kubectl create secret` steps, with the keys the manifests read.
#[test]
fn kubernetes_steps_create_every_mounted_secret() {
    let manifest = read("deploy/kubernetes/deployment.yaml");
    // (secret, key) the Deployment reads: secretKeyRef name/key, and secret volumes
    // (whose key is the file the container reads).
    let mut needed: Vec<(String, String)> = Vec::new();
    let lines: Vec<&str> = manifest.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t == "secretKeyRef:" {
            let name = lines[i + 1].trim().trim_start_matches("name:").trim();
            let key = lines[i + 2].trim().trim_start_matches("key:").trim();
            needed.push((name.into(), key.into()));
        }
        if let Some(name) = t.strip_prefix("secretName:") {
            needed.push((name.trim().into(), String::new()));
        }
    }
    assert!(!needed.is_empty(), "the Deployment reads Secrets");
    let readme = read("deploy/README.md");
    let commands = readme.replace("\\\n", " ");
    let created: Vec<&str> = commands
        .lines()
        .filter(|l| l.trim_start().starts_with("kubectl create secret generic "))
        .collect();
    let mut missing = Vec::new();
    for (secret, key) in &needed {
        let step = created
            .iter()
            .find(|l| l.split_whitespace().nth(4) == Some(secret.as_str()));
        match step {
            None => missing.push(format!("no `kubectl create secret generic {secret}` step")),
            Some(step)
                if !key.is_empty()
                    && !step.contains(&format!("--from-literal={key}="))
                    && !step.contains(&format!("--from-file={key}=")) =>
            {
                missing.push(format!(
                    "the step creating {secret} gives no key `{key}`: {step}"
                ))
            }
            Some(_) => {}
        }
    }
    // The keys file the Deployment names must be a key of the mounted Secret.
    if let Some(path) = manifest
        .lines()
        .skip_while(|l| !l.contains("SESSION_CACHE_API_KEYS_FILE"))
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("value: "))
    {
        let file = path.rsplit('/').next().unwrap();
        if !created
            .iter()
            .any(|l| l.contains(&format!("--from-file={file}")))
        {
            missing.push(format!(
                "no step puts {file} (SESSION_CACHE_API_KEYS_FILE) in a Secret"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/README.md: {}",
        missing.join("\n")
    );
}

/// Every series the code names is a row of docs/METRICS.md's table: an operator reads
/// there what a family in a scrape means.
#[test]
fn every_metric_is_documented() {
    let metrics = read("docs/METRICS.md");
    let mut named = Vec::new();
    let mut folders = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("\"session_cache_") {
                    let name = text[at + 1..].split('"').next().unwrap();
                    if name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                        named.push(name.to_owned());
                    }
                }
            }
        }
    }
    named.sort();
    named.dedup();
    assert!(named.len() > 20, "the series named in src/: {named:?}");
    let missing: Vec<_> = named
        .iter()
        .filter(|name| !metrics.contains(&format!("| `{name}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/METRICS.md's table lacks {missing:?}"
    );
}

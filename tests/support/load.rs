//! Concurrent load from inside a test: tasks that Get their own token and Set it again
//! whenever it is missing, recording every call's status, outcome and latency.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use session_cache::pb::{self, GetOutcome, session_cache_client::SessionCacheClient};
use tokio::{task::JoinHandle, time::Instant};
use tonic::{Code, transport::Channel};

use super::{in_an_hour, user};

/// Hard bounds of a load, whatever the test does.
const MAX_CALLS_PER_TASK: usize = 20_000;
const MAX_DURATION: Duration = Duration::from_secs(60);

/// One call as the load saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub started: Instant,
    pub rpc: &'static str,
    pub code: Code,
    /// The outcome enum's number (0 when the call failed).
    pub outcome: i32,
    pub latency: Duration,
}

/// Running load; [`Load::stop`] ends it and returns the samples.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// `tasks` tasks, each pausing `pause` between calls.
    pub fn start(client: &SessionCacheClient<Channel>, tasks: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|task| {
                let mut client = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let token = format!("load-{task}");
                    let user_id = format!("load-user-{task}");
                    let deadline = Instant::now() + MAX_DURATION;
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && samples.len() < MAX_CALLS_PER_TASK
                        && Instant::now() < deadline
                    {
                        let started = Instant::now();
                        let got = client
                            .get(pb::GetRequest {
                                token: token.clone(),
                            })
                            .await;
                        let (code, outcome) = match &got {
                            Ok(r) => (Code::Ok, r.get_ref().outcome),
                            Err(s) => (s.code(), 0),
                        };
                        samples.push(Sample {
                            started,
                            rpc: "Get",
                            code,
                            outcome,
                            latency: started.elapsed(),
                        });
                        if let Ok(r) = &got {
                            let r = r.get_ref();
                            if r.outcome() == GetOutcome::Hit {
                                assert_eq!(
                                    r.user.as_ref().unwrap().id,
                                    user_id,
                                    "a hit for another token's user"
                                );
                            }
                            if !r.fence.is_empty() {
                                let started = Instant::now();
                                let set = client
                                    .set(pb::SetRequest {
                                        token: token.clone(),
                                        user: Some(user(&user_id)),
                                        session_expire: Some(in_an_hour()),
                                        fence: r.fence.clone(),
                                    })
                                    .await;
                                let (code, outcome) = match &set {
                                    Ok(r) => (Code::Ok, r.get_ref().outcome),
                                    Err(s) => (s.code(), 0),
                                };
                                samples.push(Sample {
                                    started,
                                    rpc: "Set",
                                    code,
                                    outcome,
                                    latency: started.elapsed(),
                                });
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    samples
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Ends the load and returns every sample, in start order.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("a load task panicked"));
        }
        all.sort_by_key(|s| s.started);
        all
    }
}

/// The `q` quantile of the samples' latencies.
pub fn quantile(samples: &[&Sample], q: f64) -> Duration {
    let mut latencies: Vec<_> = samples.iter().map(|s| s.latency).collect();
    latencies.sort_unstable();
    latencies
        .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

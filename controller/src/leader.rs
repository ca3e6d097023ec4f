//! Leader election: the replicas share a `Lease` in the controller's namespace (through
//! kube-lease-manager); only the holder writes to the API server. Until the Lease is reached a
//! replica is not the leader, and it keeps trying with backoff.

use std::time::Duration;

use common::backoff::Backoff;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;

/// Publishes whether this replica leads, until the task is dropped.
pub async fn run(client: kube::Client, config: Config, leader: watch::Sender<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    let duration = config.lease_duration.as_secs().max(2);
    loop {
        let built = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&config.namespace)
            .with_identity(&config.pod_name)
            .with_duration(duration)
            .with_grace(duration / 3)
            .with_field_manager(format!("ambient-controller/{}", config.pod_name))
            .build()
            .await;
        let manager = match built {
            Ok(m) => m,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, ?delay, lease = %config.lease_name, "cannot set up the leader Lease; retrying");
                leader.send_replace(false);
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        backoff.reset();
        info!(lease = %config.lease_name, identity = %config.pod_name, "taking part in leader election");
        let (mut rx, task) = manager.watch().await;
        loop {
            leader.send_replace(*rx.borrow_and_update());
            if rx.changed().await.is_err() {
                break;
            }
        }
        leader.send_replace(false);
        match task.await {
            Ok(Ok(_)) => info!("leader election ended"),
            Ok(Err(e)) => warn!(error = %e, "leader election failed; starting over"),
            Err(e) => warn!(error = %e, "leader election task failed; starting over"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

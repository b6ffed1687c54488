//! Leader election with a coordination.k8s.io Lease: only the leader writes
//! status; every replica serves snapshots and the webhook.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and others retry).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Whether `holder` may take the lease now: it holds it already, nobody does,
/// or the holder's renewal is older than the lease duration. Pure.
pub fn may_acquire(spec: &LeaseSpec, holder: &str, now: k8s_openapi::jiff::Timestamp) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(current) if current == holder => true,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .unwrap_or(LEASE_DURATION.as_secs() as i32);
            spec.renew_time
                .as_ref()
                .is_none_or(|renewed| renewed.0.as_second() + i64::from(duration) < now.as_second())
        }
    }
}

/// Runs the election forever, publishing whether this replica leads.
pub async fn run(
    client: Client,
    namespace: String,
    lease_name: String,
    holder: String,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let leading = match try_acquire(&api, &lease_name, &holder).await {
            Ok(leading) => leading,
            Err(error) => {
                tracing::warn!(%error, lease = %lease_name, "leader election failed; not leading until it succeeds");
                false
            }
        };
        if leader.send_if_modified(|l| std::mem::replace(l, leading) != leading) {
            tracing::info!(leading, holder = %holder, "leadership changed");
        }
        tokio::time::sleep(RENEW_INTERVAL).await;
    }
}

/// Gives the lease up if `holder` holds it (for a stopping replica): another
/// replica takes it at its next try instead of after [`LEASE_DURATION`].
/// Returns whether it was held. A compare-and-swap: a lease another replica
/// took meanwhile is left alone.
pub async fn release(
    client: Client,
    namespace: &str,
    lease_name: &str,
    holder: &str,
) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let Some(mut lease) = api.get_opt(lease_name).await? else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(false);
    };
    if spec.holder_identity.as_deref() != Some(holder) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    match api
        .replace(lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn try_acquire(api: &Api<Lease>, name: &str, holder: &str) -> Result<bool, kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut lease = match api.get_opt(name).await? {
        Some(lease) => lease,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                spec: Some(held_by(holder, now, None)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if !may_acquire(&spec, holder, now) {
        return Ok(false);
    }
    let acquired = spec.holder_identity.as_deref() == Some(holder) && spec.acquire_time.is_some();
    let mut next = held_by(
        holder,
        now,
        if acquired {
            spec.acquire_time.clone()
        } else {
            None
        },
    );
    next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(!acquired));
    lease.spec = Some(next);
    // The resourceVersion in `lease` makes this a compare-and-swap.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn held_by(
    holder: &str,
    now: k8s_openapi::jiff::Timestamp,
    acquired: Option<MicroTime>,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.to_owned()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_expires() {
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(1000))),
            ..Default::default()
        };
        assert!(may_acquire(&spec, "a", at(1001)), "the holder renews");
        assert!(!may_acquire(&spec, "b", at(1010)), "still valid");
        assert!(may_acquire(&spec, "b", at(1016)), "expired");
        assert!(may_acquire(&LeaseSpec::default(), "b", at(0)), "unheld");
    }
}

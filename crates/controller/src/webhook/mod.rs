//! The sidecar-injection mutating admission webhook.

//! The controller's own CA and serving certificate, kept in a Secret shared by
//! the replicas and renewed before expiry.

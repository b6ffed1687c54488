use super::*;

#[test]
fn defaults_without_environment() {
    assert_eq!(Settings::from_lookup(|_| None), Ok(Settings::default()));
    assert_eq!(Settings::default().max_body_bytes, 1_048_576);
}

#[test]
fn reads_and_validates_variables() {
    let settings = Settings::from_lookup(|name| match name {
        ENV_MAX_BODY_BYTES => Some("2048".to_owned()),
        ENV_POD_NAME => Some("agent-0".to_owned()),
        _ => None,
    })
    .unwrap();
    assert_eq!(settings.max_body_bytes, 2048);
    assert_eq!(settings.pod_name, "agent-0");
    let settings = Settings::from_lookup(|name| match name {
        ENV_AUDIT_CHECKPOINT_EVERY => Some("10".to_owned()),
        ENV_AUDIT_CHECKPOINT_INTERVAL_MS => Some("250".to_owned()),
        _ => None,
    })
    .unwrap();
    assert_eq!(settings.audit_checkpoint_every, 10);
    assert_eq!(
        settings.audit_checkpoint_interval,
        Duration::from_millis(250)
    );
    assert!(
        Settings::from_lookup(|name| (name == ENV_AUDIT_CHECKPOINT_EVERY).then(|| "0".into()))
            .is_err()
    );
    let err = Settings::from_lookup(|name| (name == ENV_MAX_SESSIONS).then(|| "0".to_owned()));
    assert!(err.is_err());
}

#[test]
fn reads_listener_and_abuse_limits() {
    let settings = Settings::from_lookup(|name| match name {
        ENV_HEADER_READ_TIMEOUT_MS => Some("300".to_owned()),
        ENV_CONNECTION_IDLE_TIMEOUT_MS => Some("2000".to_owned()),
        ENV_MAX_CONNECTIONS => Some("8".to_owned()),
        ENV_INBOUND_MAX_CONNECTIONS => Some("4".to_owned()),
        ENV_REPLAY_CACHE_PER_ISSUER => Some("16".to_owned()),
        ENV_MAX_DELEGATED_SESSIONS_PER_CALLER => Some("32".to_owned()),
        ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS => Some("600".to_owned()),
        _ => None,
    })
    .unwrap();
    assert_eq!(settings.header_read_timeout, Duration::from_millis(300));
    assert_eq!(settings.connection_idle_timeout, Duration::from_secs(2));
    assert_eq!(settings.max_connections, 8);
    assert_eq!(settings.inbound_max_connections, 4);
    assert_eq!(settings.replay_cache_per_issuer, 16);
    assert_eq!(settings.max_delegated_sessions_per_caller, 32);
    assert_eq!(
        settings.initiator_max_token_lifetime,
        Duration::from_secs(600)
    );
    for name in [
        ENV_HEADER_READ_TIMEOUT_MS,
        ENV_MAX_CONNECTIONS,
        ENV_REPLAY_CACHE_PER_ISSUER,
        ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS,
    ] {
        let err = Settings::from_lookup(|n| (n == name).then(|| "0".to_owned()));
        assert_eq!(err.map_err(|e| e.name), Err(name));
    }
}

#[test]
fn controller_mode_only_with_an_address() {
    assert_eq!(Settings::from_lookup(|_| None).unwrap().controller, None);
    let settings = Settings::from_lookup(|name| {
        (name == ENV_CONTROLLER_ADDRESS)
            .then(|| "chaperone-controller.chaperone-system.svc:9090".to_owned())
    })
    .unwrap();
    let controller = settings.controller.unwrap();
    assert_eq!(
        controller.server_name,
        "chaperone-controller.chaperone-system.svc"
    );
    assert_eq!(controller.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
    assert_eq!(
        controller.ca,
        CaSource::File(PathBuf::from(DEFAULT_CA_FILE))
    );
}

#[test]
fn controller_overrides_and_inline_ca() {
    let settings = Settings::from_lookup(|name| match name {
        ENV_CONTROLLER_ADDRESS => Some("127.0.0.1:9090".to_owned()),
        ENV_CONTROLLER_SERVER_NAME => Some("localhost".to_owned()),
        ENV_TOKEN_FILE => Some("/tmp/token".to_owned()),
        ENV_CA_FILE => Some("/tmp/ca.pem".to_owned()),
        ENV_CA_PEM => Some("-----BEGIN CERTIFICATE-----".to_owned()),
        _ => None,
    })
    .unwrap();
    let controller = settings.controller.unwrap();
    assert_eq!(controller.server_name, "localhost");
    assert_eq!(controller.token_file, PathBuf::from("/tmp/token"));
    assert!(matches!(controller.ca, CaSource::Pem(_)));
}

#[test]
fn tool_mode_needs_what_it_fronts_and_its_audience() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    assert!(Settings::from_lookup(env(&[(ENV_MODE, "tool")])).is_err());
    assert!(Settings::from_lookup(env(&[(ENV_MODE, "gateway")])).is_err());
    assert!(
        Settings::from_lookup(env(&[(ENV_INBOUND_UPSTREAM, "https://127.0.0.1:8080")])).is_err()
    );
    let settings = Settings::from_lookup(env(&[
        (ENV_MODE, "tool"),
        (ENV_INBOUND_UPSTREAM, "http://127.0.0.1:8080"),
        (
            ENV_INBOUND_AUDIENCES,
            "billing, http://billing.tools.svc:8080/mcp",
        ),
    ]))
    .unwrap();
    assert_eq!(settings.mode, SidecarMode::Tool);
    assert_eq!(
        settings.inbound_audiences,
        ["billing", "http://billing.tools.svc:8080/mcp"]
    );
    // It signs no assertions: no nonces are made for it.
    assert_eq!(settings.signing_nonces, 1024);
    assert_eq!(settings.signing_nonces_kept(), 0);
    assert_eq!(Settings::default().signing_nonces_kept(), 1024);
}

#[test]
fn controller_address_needs_host_and_port() {
    for bad in ["no-port", "host:", ":9090", "host:port"] {
        let err =
            Settings::from_lookup(|name| (name == ENV_CONTROLLER_ADDRESS).then(|| bad.to_owned()));
        assert!(err.is_err(), "{bad}");
    }
    assert_eq!(host_of("[::1]:9090"), Some("::1"));
}

#[test]
fn reads_the_approval_hold() {
    assert_eq!(Settings::default().approval_hold, Duration::from_secs(20));
    let settings =
        Settings::from_lookup(|name| (name == ENV_APPROVAL_HOLD_SECONDS).then(|| "45".to_owned()))
            .unwrap();
    assert_eq!(settings.approval_hold, Duration::from_secs(45));
    for bad in ["0", "-1", "soon"] {
        let err = Settings::from_lookup(|name| {
            (name == ENV_APPROVAL_HOLD_SECONDS).then(|| bad.to_owned())
        })
        .unwrap_err();
        assert_eq!(err.name, ENV_APPROVAL_HOLD_SECONDS, "{bad}");
    }
}

#[test]
fn reads_the_shutdown_grace() {
    assert_eq!(Settings::default().shutdown_grace, Duration::from_secs(10));
    let settings =
        Settings::from_lookup(|name| (name == ENV_SHUTDOWN_GRACE_MS).then(|| "2500".to_owned()))
            .unwrap();
    assert_eq!(settings.shutdown_grace, Duration::from_millis(2500));
    for bad in ["0", "-5", "10s"] {
        let err =
            Settings::from_lookup(|name| (name == ENV_SHUTDOWN_GRACE_MS).then(|| bad.to_owned()))
                .unwrap_err();
        assert_eq!(err.name, ENV_SHUTDOWN_GRACE_MS, "{bad}");
    }
}

#[test]
fn reads_the_worker_threads() {
    assert_eq!(Settings::default().worker_threads.get(), 1);
    let settings =
        Settings::from_lookup(|name| (name == ENV_WORKER_THREADS).then(|| " 4 ".to_owned()))
            .unwrap();
    assert_eq!(settings.worker_threads.get(), 4);
    for bad in ["0", "-1", "two", ""] {
        let err =
            Settings::from_lookup(|name| (name == ENV_WORKER_THREADS).then(|| bad.to_owned()))
                .unwrap_err();
        assert_eq!(err.name, ENV_WORKER_THREADS, "{bad}");
    }
}

#[test]
fn reads_the_signing_nonce_pool_size() {
    assert_eq!(Settings::default().signing_nonces, 1024);
    for (value, size) in [(" 64 ", 64), ("0", 0), ("65536", 65_536)] {
        let settings =
            Settings::from_lookup(|name| (name == ENV_SIGNING_NONCES).then(|| value.to_owned()))
                .unwrap();
        assert_eq!(settings.signing_nonces, size, "{value}");
    }
    for bad in ["-1", "many", "", "65537", "100000000000"] {
        let err =
            Settings::from_lookup(|name| (name == ENV_SIGNING_NONCES).then(|| bad.to_owned()))
                .unwrap_err();
        assert_eq!(err.name, ENV_SIGNING_NONCES, "{bad}");
    }
}

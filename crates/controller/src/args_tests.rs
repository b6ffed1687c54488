//! Tests of the settings built from the controller's flags.

use super::*;
use crate::webhook::FailurePolicy;

/// The flags `flags` as the controller parses them.
fn parse(flags: &[&str]) -> Args {
    <Args as clap::Parser>::try_parse_from(
        std::iter::once("chaperone-controller").chain(flags.iter().copied()),
    )
    .expect("flags parse")
}

fn from_flags(flags: &[&str]) -> Result<InjectionSettings, InvalidSetting> {
    InjectionSettings::from_args(&parse(flags))
}

#[test]
fn settings_come_from_the_charts_variables() {
    let settings = from_flags(&[
        "--sidecar-image-pull-policy=Always",
        "--sidecar-cpu-request=100m",
        "--sidecar-cpu-limit=1",
        "--sidecar-memory-request=128Mi",
        "--sidecar-memory-limit=512Mi",
        "--webhook-failure-policy=Ignore",
    ])
    .unwrap();
    assert_eq!(settings.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        settings.resources,
        ProxyResources {
            cpu_request: 100,
            cpu_limit: Some(1000),
            memory_request: 128 << 20,
            memory_limit: 512 << 20,
        }
    );
    assert_eq!(settings.failure_policy, FailurePolicy::Ignore);
}

#[test]
fn unset_or_empty_settings_keep_the_defaults() {
    for flags in [
        &[][..],
        &[
            "--sidecar-image-pull-policy=",
            "--sidecar-cpu-request=",
            "--sidecar-cpu-limit=",
            "--sidecar-memory-request= ",
            "--sidecar-memory-limit=",
        ],
    ] {
        let settings = from_flags(flags).unwrap();
        assert_eq!(settings.image_pull_policy, None, "{flags:?}");
        assert_eq!(settings.resources, ProxyResources::default(), "{flags:?}");
        assert_eq!(settings.failure_policy, FailurePolicy::Fail, "{flags:?}");
    }
}

#[test]
fn bad_settings_stop_the_controller_naming_the_variable() {
    for (flag, env) in [
        (
            "--sidecar-image-pull-policy=always",
            "CHAPERONE_SIDECAR_IMAGE_PULL_POLICY",
        ),
        (
            "--sidecar-cpu-request=lots",
            "CHAPERONE_SIDECAR_CPU_REQUEST",
        ),
        ("--sidecar-cpu-limit=0", "CHAPERONE_SIDECAR_CPU_LIMIT"),
        (
            "--sidecar-memory-request=1Xi",
            "CHAPERONE_SIDECAR_MEMORY_REQUEST",
        ),
        (
            "--sidecar-memory-limit=-64Mi",
            "CHAPERONE_SIDECAR_MEMORY_LIMIT",
        ),
        (
            "--webhook-failure-policy=fail",
            "CHAPERONE_WEBHOOK_FAILURE_POLICY",
        ),
    ] {
        let err = from_flags(&[flag]).unwrap_err();
        assert_eq!(err.env, env, "{flag}: {err}");
        let message = err.to_string();
        assert!(message.contains(env), "{message}");
    }
    let err = from_flags(&[
        "--sidecar-memory-request=1Gi",
        "--sidecar-memory-limit=512Mi",
    ])
    .unwrap_err();
    assert_eq!(err.env, "CHAPERONE_SIDECAR_MEMORY_LIMIT", "{err}");
    assert!(err.to_string().contains("above the memory limit"), "{err}");
}

#[test]
fn external_tls_comes_from_the_flag() {
    assert_eq!(
        CertConfig::from_args(&parse(&[])).source,
        CertSource::SelfManaged
    );
    for flag in ["--external-tls", "--external-tls=true", "--external-tls=1"] {
        let config = CertConfig::from_args(&parse(&[flag]));
        assert_eq!(config.source, CertSource::External, "{flag}");
        assert!(config.renew_interval <= Duration::from_secs(300));
    }
    assert_eq!(
        CertConfig::from_args(&parse(&["--external-tls=false"])).source,
        CertSource::SelfManaged
    );
    let err =
        <Args as clap::Parser>::try_parse_from(["chaperone-controller", "--external-tls=maybe"])
            .unwrap_err();
    assert!(err.to_string().contains("CHAPERONE_EXTERNAL_TLS"), "{err}");
}

#[test]
fn approval_retention_is_a_duration_of_at_least_a_second() {
    assert_eq!(
        parse(&[]).approval_settings().retention,
        Duration::from_secs(3600)
    );
    assert_eq!(
        parse(&["--approval-retention=1h30m"]).approval_retention,
        Duration::from_secs(5400)
    );
    assert_eq!(
        parse(&["--approval-retention=90s"]).approval_retention,
        Duration::from_secs(90)
    );
    for bad in ["0s", "1d", "soon", ""] {
        let error = <Args as clap::Parser>::try_parse_from([
            "chaperone-controller",
            &format!("--approval-retention={bad}"),
        ])
        .expect_err(bad)
        .to_string();
        assert!(error.contains("--approval-retention"), "{bad}: {error}");
    }
}

#[test]
fn the_approval_hold_reaches_the_injected_sidecars() {
    let settings = |args: &[&str]| InjectionSettings::from_args(&parse(args)).unwrap();
    assert_eq!(settings(&[]).approval_hold_seconds, 20);
    assert_eq!(
        settings(&["--sidecar-approval-hold-seconds=45"]).approval_hold_seconds,
        45
    );
    for bad in ["0", "3601", "soon"] {
        let error = <Args as clap::Parser>::try_parse_from([
            "chaperone-controller",
            &format!("--sidecar-approval-hold-seconds={bad}"),
        ])
        .expect_err(bad)
        .to_string();
        assert!(
            error.contains("--sidecar-approval-hold-seconds"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn the_service_account_names_the_controllers_own_user() {
    assert_eq!(parse(&[]).service_account_username(), None);
    assert_eq!(
        parse(&["--service-account= "]).service_account_username(),
        None
    );
    assert_eq!(
        parse(&["--namespace=ops", "--service-account=chaperone-controller"])
            .service_account_username()
            .as_deref(),
        Some("system:serviceaccount:ops:chaperone-controller")
    );
}

#[test]
fn the_sidecars_uid_is_unset_by_default_and_pinned_when_given() {
    assert_eq!(from_flags(&[]).unwrap().run_as_user, None);
    assert_eq!(
        from_flags(&["--sidecar-run-as-user=1000650000"])
            .unwrap()
            .run_as_user,
        Some(1_000_650_000)
    );
    assert_eq!(
        from_flags(&["--sidecar-run-as-user="]).unwrap().run_as_user,
        None
    );
    for bad in ["0", "-1", "root"] {
        let error = from_flags(&[&format!("--sidecar-run-as-user={bad}")]).unwrap_err();
        assert!(
            error.to_string().contains("CHAPERONE_SIDECAR_RUN_AS_USER"),
            "{bad}: {error}"
        );
    }
}

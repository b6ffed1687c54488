use super::*;
use crate::assertion::{AssertionSigner, Claims};
use chaperone_policy::EffectSet;

const NOW: i64 = 2_000_000_000;

fn keys_for(signer: &AssertionSigner, agent: &str) -> PeerKeys {
    let mut jwk = signer.registration().jwk.clone();
    jwk[JWK_AGENT_MEMBER] = serde_json::json!(agent);
    PeerKeys::from_json(&serde_json::json!({ "keys": [jwk] }).to_string()).unwrap()
}

fn token(signer: &AssertionSigner, iss: &str, aud: &str, jti: &str, iat: i64) -> String {
    let ctx = TaskContext {
        effects: EffectSet::EMPTY,
        steps: 1,
        prev: "ab".into(),
    };
    signer.sign(&Claims {
        iss,
        sub: iss,
        act: None,
        aud,
        exp: iat + 60,
        iat,
        jti,
        sid: "s1",
        tool: "t",
        args: "sha256:00",
        snap: 1,
        ctx: &ctx,
    })
}

#[test]
fn accepts_a_good_assertion_once() {
    let signer = AssertionSigner::generate().unwrap();
    let keys = keys_for(&signer, "ns/a");
    let aud = vec!["chaperone:agent:ns/b".to_owned()];
    let replay = ReplayCache::new(10);
    let t = token(&signer, "chaperone:agent:ns/a", &aud[0], "j1", NOW);
    let claims = verify_assertion(&t, &keys, &aud, &replay, NOW).unwrap();
    assert_eq!(claims.caller(), "ns/a");
    assert_eq!(claims.ctx.unwrap().prev, "ab");
    assert_eq!(
        verify_assertion(&t, &keys, &aud, &replay, NOW + 1),
        Err(AssertionRefused::Replayed("j1".into()))
    );
}

#[test]
fn refuses_each_failure_with_its_reason() {
    let signer = AssertionSigner::generate().unwrap();
    let other = AssertionSigner::generate().unwrap();
    let keys = keys_for(&signer, "ns/a");
    let aud = vec!["chaperone:agent:ns/b".to_owned()];
    let replay = ReplayCache::new(10);
    let check = |t: &str| verify_assertion(t, &keys, &aud, &replay, NOW);

    assert!(matches!(check("a.b"), Err(AssertionRefused::Malformed(_))));
    let forged = token(&other, "chaperone:agent:ns/a", &aud[0], "j2", NOW);
    assert!(matches!(
        check(&forged),
        Err(AssertionRefused::UnknownKey(_))
    ));
    let good = token(&signer, "chaperone:agent:ns/a", &aud[0], "j3", NOW);
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    assert!(matches!(
        check(&tampered),
        Err(AssertionRefused::BadSignature | AssertionRefused::Malformed(_))
    ));
    let spoofed = token(&signer, "chaperone:agent:ns/c", &aud[0], "j4", NOW);
    assert!(matches!(
        check(&spoofed),
        Err(AssertionRefused::IssuerMismatch { .. })
    ));
    let wrong = token(&signer, "chaperone:agent:ns/a", "http://x", "j5", NOW);
    assert_eq!(
        check(&wrong),
        Err(AssertionRefused::WrongAudience("http://x".into()))
    );
    let old = token(&signer, "chaperone:agent:ns/a", &aud[0], "j6", NOW - 120);
    assert_eq!(check(&old), Err(AssertionRefused::Expired(NOW - 60)));
    let future = token(&signer, "chaperone:agent:ns/a", &aud[0], "j7", NOW + 60);
    assert!(matches!(
        check(&future),
        Err(AssertionRefused::BadValidity { .. })
    ));
    // Refused assertions are not remembered: only accepted ones are.
    assert_eq!(replay.len(), 0);
}

/// `genuine`'s claims with `argsAlg` set to `alg` (removed for `None`) and
/// a fresh `jti`, signed by `signer`.
fn with_args_alg(signer: &AssertionSigner, genuine: &str, alg: Option<&str>, jti: &str) -> String {
    let payload = genuine.split('.').nth(1).unwrap();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let object = claims.as_object_mut().unwrap();
    match alg {
        Some(alg) => object.insert("argsAlg".into(), alg.into()),
        None => object.remove("argsAlg"),
    };
    object.insert("jti".into(), jti.into());
    let header = genuine.split('.').next().unwrap();
    let signed = format!(
        "{header}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature = signer.sign_detached(signed.as_bytes());
    format!("{signed}.{signature}")
}

#[test]
fn accepts_the_rfc_8785_digest_or_none_named() {
    let signer = AssertionSigner::generate().unwrap();
    let keys = keys_for(&signer, "ns/a");
    let aud = vec!["chaperone:agent:ns/b".to_owned()];
    let replay = ReplayCache::new(10);
    let genuine = token(&signer, "chaperone:agent:ns/a", &aud[0], "j1", NOW);
    let claims = verify_assertion(&genuine, &keys, &aud, &replay, NOW).unwrap();
    assert_eq!(claims.args_alg.as_deref(), Some("sha256-rfc8785"));
    let unnamed = with_args_alg(&signer, &genuine, None, "j2");
    let claims = verify_assertion(&unnamed, &keys, &aud, &replay, NOW).unwrap();
    assert_eq!(claims.args_alg, None);
}

#[test]
fn refuses_an_args_digest_of_another_algorithm() {
    let signer = AssertionSigner::generate().unwrap();
    let keys = keys_for(&signer, "ns/a");
    let aud = vec!["chaperone:agent:ns/b".to_owned()];
    let replay = ReplayCache::new(10);
    let genuine = token(&signer, "chaperone:agent:ns/a", &aud[0], "j1", NOW);
    for (at, alg) in ["sha256-utf8-sorted", "SHA256-RFC8785", ""]
        .into_iter()
        .enumerate()
    {
        let other = with_args_alg(&signer, &genuine, Some(alg), &format!("j{}", at + 2));
        let refused = verify_assertion(&other, &keys, &aud, &replay, NOW);
        assert_eq!(refused, Err(AssertionRefused::ArgsAlgorithm(alg.into())));
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("only \"sha256-rfc8785\"")
        );
    }
    assert_eq!(replay.len(), 0);
}

#[test]
fn replay_share_is_bounded_and_forgets_expired_ids() {
    let cache = ReplayCache::new(2);
    cache.check_and_record("p", "a", NOW + 10, NOW).unwrap();
    cache.check_and_record("p", "b", NOW + 10, NOW).unwrap();
    assert_eq!(
        cache.check_and_record("p", "c", NOW + 10, NOW),
        Err(AssertionRefused::ReplayShareFull {
            issuer: "p".into(),
            capacity: 2
        })
    );
    cache
        .check_and_record("p", "c", NOW + 100, NOW + 60)
        .unwrap();
    assert_eq!(cache.len(), 1);
}

#[test]
fn one_issuer_filling_its_share_blocks_only_itself() {
    let cache = ReplayCache::new(3);
    cache
        .check_and_record("victim", "v1", NOW + 60, NOW)
        .unwrap();
    for i in 0..3 {
        cache
            .check_and_record("attacker", &format!("x{i}"), NOW + 300, NOW)
            .unwrap();
    }
    let refused = cache.check_and_record("attacker", "x3", NOW + 300, NOW);
    let Err(AssertionRefused::ReplayShareFull { issuer, .. }) = &refused else {
        panic!("{refused:?}");
    };
    assert_eq!(issuer, "attacker");
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("share of issuer \"attacker\" is full")
    );
    // The victim's entries stay (its replays are still caught) and it can
    // keep calling.
    assert_eq!(
        cache.check_and_record("victim", "v1", NOW + 60, NOW + 1),
        Err(AssertionRefused::Replayed("v1".into()))
    );
    cache
        .check_and_record("victim", "v2", NOW + 60, NOW)
        .unwrap();
    assert_eq!(cache.held_by("victim"), 2);
    assert_eq!(cache.held_by("attacker"), 3);
}

#[test]
fn the_same_id_from_two_issuers_is_two_assertions() {
    let cache = ReplayCache::new(3);
    cache.check_and_record("a", "j", NOW + 60, NOW).unwrap();
    cache.check_and_record("b", "j", NOW + 60, NOW).unwrap();
    assert_eq!(
        cache.check_and_record("a", "j", NOW + 60, NOW),
        Err(AssertionRefused::Replayed("j".into()))
    );
}

#[test]
fn idle_issuers_shares_are_swept() {
    let cache = ReplayCache::new(3);
    cache.check_and_record("gone", "g", NOW + 10, NOW).unwrap();
    cache
        .check_and_record("other", "o", NOW + 1000, NOW + REPLAY_SWEEP_SECONDS)
        .unwrap();
    assert_eq!(cache.held_by("gone"), 0);
    assert_eq!(cache.len(), 1);
}

//! Property tests over random policies and calls: deny always wins, then
//! requireApproval, nothing is allowed without a matching allow (or an
//! approval), an approval never lifts a deny, tools/list never hides an allowed
//! or approvable tool, delegated authority is within delegator ∩ grant ∩
//! delegate, and compiling is deterministic.

mod support;

use chaperone_policy::model::{
    AgentIdentitySpec, AgentRef, AgentSelector, ArgMatcher, Conditions, DelegationGrantSpec,
    DelegationSettings, Effect, NamespacedAgentRef, Object, ObjectMeta, Rule, RuleAction,
    ToolClassification, ToolMatch, ToolPolicySpec, ToolServer,
};
use chaperone_policy::{
    CompileOptions, DecisionRequest, Engine, ObjectSet, RuleOutcome, SessionHistory, Verdict,
    compile_all,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::*;

const SERVERS: [&str; 2] = ["alpha", "beta"];
const TOOLS: [&str; 5] = ["get", "set", "Get", "ge\u{0442}", "delete"];

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: Some("default".into()),
        ..ObjectMeta::default()
    }
}

fn identity(name: &str, require_delegation: bool) -> Object<AgentIdentitySpec> {
    Object {
        api_version: "chaperone.dev/v1alpha1".into(),
        metadata: meta(name),
        spec: AgentIdentitySpec {
            selector: AgentSelector {
                service_account_name: name.into(),
                ..AgentSelector::default()
            },
            tool_servers: SERVERS
                .iter()
                .map(|s| ToolServer {
                    tool_pinning: Default::default(),
                    upstream_secret: None,
                    name: (*s).into(),
                    url: format!("http://{s}"),
                    audience: None,
                    agent: None,
                })
                .collect(),
            delegation: Some(DelegationSettings { require_delegation }),
            ..AgentIdentitySpec::default()
        },
    }
}

fn tool_match() -> impl Strategy<Value = ToolMatch> {
    let server = prop_oneof![
        Just("*".to_owned()),
        Just("alpha".to_owned()),
        Just("beta".to_owned())
    ];
    let name = prop_oneof![
        (0..TOOLS.len()).prop_map(|i| TOOLS[i].to_owned()),
        Just("*".to_owned()),
        Just("g*".to_owned()),
        Just("?et".to_owned()),
    ];
    let by_name = (server.clone(), name).prop_map(|(server, name)| ToolMatch {
        server,
        name: Some(name),
        effect: None,
    });
    let by_effect = (
        server,
        prop_oneof![Just(Effect::Read), Just(Effect::Destructive)],
    )
        .prop_map(|(server, effect)| ToolMatch {
            server,
            name: None,
            effect: Some(effect),
        });
    prop_oneof![3 => by_name, 1 => by_effect]
}

fn arg_matcher() -> impl Strategy<Value = ArgMatcher> {
    // Mostly `/x`, which the arguments set (or not); sometimes `/y`, which they
    // never do: rules of one call share resolved pointers, present or absent.
    prop_oneof![2 => Just("/x"), 1 => Just("/y")].prop_flat_map(arg_matcher_on)
}

fn arg_matcher_on(pointer: &'static str) -> impl Strategy<Value = ArgMatcher> {
    let base = move || ArgMatcher {
        pointer: pointer.into(),
        ..ArgMatcher::default()
    };
    prop_oneof![
        (-5i64..5).prop_map(move |n| ArgMatcher {
            less_than: Some(n.into()),
            ..base()
        }),
        (-5i64..5).prop_map(move |n| ArgMatcher {
            equals: Some(json!(n)),
            ..base()
        }),
        any::<bool>().prop_map(move |b| ArgMatcher {
            exists: Some(b),
            ..base()
        }),
        Just(ArgMatcher {
            prefix: Some("a".into()),
            ..base()
        }),
    ]
}

fn conditions() -> impl Strategy<Value = Option<Conditions>> {
    prop_oneof![
        2 => Just(None),
        2 => prop::collection::vec(arg_matcher(), 1..3).prop_map(|args| Some(Conditions {
            args,
            ..Conditions::default()
        })),
        1 => (-5i64..5).prop_map(|n| Some(Conditions {
            expression: Some(format!("args.x > {n}")),
            ..Conditions::default()
        })),
    ]
}

fn rule(index: usize) -> impl Strategy<Value = Rule> {
    let action = prop_oneof![
        2 => Just(RuleAction::Allow),
        2 => Just(RuleAction::Deny),
        1 => Just(RuleAction::RequireApproval),
    ];
    (
        action,
        prop::collection::vec(tool_match(), 1..3),
        conditions(),
    )
        .prop_map(move |(action, tools, when)| Rule {
            name: format!("r{index}"),
            action,
            tools,
            when,
            rate_limit: None,
            approval: None,
        })
}

fn policy(name: String, target: &'static str) -> impl Strategy<Value = Object<ToolPolicySpec>> {
    let rules = (1usize..6).prop_flat_map(|n| (0..n).map(rule).collect::<Vec<_>>());
    let classifications = prop::collection::vec(
        (
            0..TOOLS.len(),
            prop_oneof![Just(Effect::Read), Just(Effect::Destructive)],
        ),
        0..3,
    );
    (rules, classifications).prop_map(move |(rules, classifications)| Object {
        api_version: "chaperone.dev/v1alpha1".into(),
        metadata: meta(&name),
        spec: ToolPolicySpec {
            target_refs: Some(vec![AgentRef {
                name: target.into(),
            }]),
            agent_selector: None,
            tools: classifications
                .into_iter()
                .map(|(t, e)| ToolClassification {
                    definition: None,
                    server: "*".into(),
                    name: TOOLS[t].into(),
                    effects: vec![e],
                })
                .collect(),
            rules,
        },
    })
}

fn arguments() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-6i64..6).prop_map(|n| json!({ "x": n })),
        (-6i64..6).prop_map(|n| json!({ "x": n as f64 + 0.5 })),
        Just(json!({})),
        Just(json!({"x": "abc"})),
        Just(json!({"x": null})),
        Just(json!({"x": [1]})),
        Just(json!({"x": 1e300})),
    ]
}

fn call() -> impl Strategy<Value = (usize, usize, Value)> {
    (0..SERVERS.len(), 0..TOOLS.len(), arguments())
}

fn engines(set: &ObjectSet) -> Vec<Engine> {
    let compiled = compile_all(
        &set.inventory(),
        &CompileOptions {
            version: 1,
            now: NOW,
        },
    );
    assert!(compiled.errors.is_empty(), "{:#?}", compiled.errors);
    compiled
        .snapshots
        .iter()
        .map(|s| Engine::new(s).expect("engine"))
        .collect()
}

fn own_request<'a>(
    server: usize,
    tool: usize,
    args: &'a Value,
    session: &'a SessionHistory,
) -> DecisionRequest<'a> {
    request(SERVERS[server], TOOLS[tool], args, session)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn deny_wins_then_approval_and_nothing_is_allowed_without_a_matching_allow(
        p in policy("p".into(), "agent"),
        calls in prop::collection::vec(call(), 1..8),
    ) {
        let set = ObjectSet { identities: vec![identity("agent", false)], policies: vec![p], grants: vec![] };
        let engine = &engines(&set)[0];
        let session = SessionHistory::new();
        for (server, tool, args) in &calls {
            let explanation = engine.explain(&own_request(*server, *tool, args, &session));
            let matched = |action: RuleAction| explanation.rules.iter().any(|r| r.action == action
                && matches!(r.outcome, RuleOutcome::Decided | RuleOutcome::Matched | RuleOutcome::MatchedFailClosed { .. }));
            let deny_matched = matched(RuleAction::Deny);
            let approval_matched = matched(RuleAction::RequireApproval);
            let allow_matched = matched(RuleAction::Allow);
            // The indexed decision agrees with a scan of every rule.
            let expected = if deny_matched {
                Verdict::Deny
            } else if approval_matched {
                Verdict::RequireApproval
            } else if allow_matched {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            let verdict = explanation.decision.verdict;
            prop_assert_eq!(verdict, expected, "{:#?}", explanation);
            if verdict != Verdict::Deny {
                let decided = explanation.rules.iter().find(|r| r.outcome == RuleOutcome::Decided);
                let action = if verdict == Verdict::Allow { RuleAction::Allow } else { RuleAction::RequireApproval };
                prop_assert!(decided.is_some_and(|r| r.action == action));
                // tools/list never hides a tool that some call is allowed.
                prop_assert!(engine.visible(SERVERS[*server], TOOLS[*tool]));
            }
            // An approval turns exactly the calls needing one into allows.
            let approved = DecisionRequest { approved: true, ..own_request(*server, *tool, args, &session) };
            let after = engine.decide(&approved).verdict;
            prop_assert_eq!(after, if verdict == Verdict::Deny { Verdict::Deny } else { Verdict::Allow });
        }
    }

    #[test]
    fn delegated_authority_is_within_delegator_grant_and_delegate(
        a in policy("pa".into(), "a"),
        b in policy("pb".into(), "b"),
        g in policy("pg".into(), "g"),
        max_depth in 0u32..2,
        calls in prop::collection::vec(call(), 1..8),
    ) {
        // The grant's scope is the first rule of `g`, also compiled as agent g's
        // sole allow rule, so "the grant covers it" can be decided on its own.
        let scope = g.spec.rules[0].clone();
        let mut g = g;
        g.spec.rules = vec![Rule { action: RuleAction::Allow, ..scope.clone() }];
        let grant = Object {
            api_version: "chaperone.dev/v1alpha1".into(),
            metadata: meta("a-to-b"),
            spec: DelegationGrantSpec {
                from: AgentRef { name: "a".into() },
                to: NamespacedAgentRef { name: "b".into(), namespace: None },
                tools: scope.tools.clone(),
                when: scope.when.clone(),
                max_depth,
                expires_at: None,
                ttl: Some("1h".into()),
            },
        };
        // g classifies tools like a (grant effect matches read the delegator's).
        g.spec.tools = a.spec.tools.clone();
        let set = ObjectSet {
            identities: vec![identity("a", false), identity("b", true), identity("g", false)],
            policies: vec![a, b.clone(), g],
            grants: vec![grant],
        };
        let engines = engines(&set);
        let (engine_a, engine_b, engine_g) = (&engines[0], &engines[1], &engines[2]);
        // b's own rules without requireDelegation.
        let b_alone = ObjectSet { identities: vec![identity("b", false)], policies: vec![b], grants: vec![] };
        let engine_b_alone = &self::engines(&b_alone)[0];
        let chain = chain(&[("default/a", "default/a-to-b")]);
        let session = SessionHistory::new();
        for (server, tool, args) in &calls {
            let own = own_request(*server, *tool, args, &session);
            let delegated = DecisionRequest { delegation: Some(&chain), ..own };
            let decision = engine_b.decide(&delegated);
            // requireDelegation: nothing outside the delegated session.
            prop_assert_eq!(engine_b.decide(&own).verdict, Verdict::Deny);
            let (by_a, by_g, by_b) = (
                engine_a.decide(&own).verdict,
                engine_g.decide(&own).verdict,
                engine_b_alone.decide(&own).verdict,
            );
            match decision.verdict {
                Verdict::Allow => {
                    prop_assert_eq!(by_a, Verdict::Allow, "delegator");
                    prop_assert_eq!(by_g, Verdict::Allow, "grant");
                    prop_assert_eq!(by_b, Verdict::Allow, "delegate");
                }
                Verdict::RequireApproval => {
                    // Nobody denies, and somebody asks.
                    prop_assert_ne!(by_a, Verdict::Deny, "delegator");
                    prop_assert_eq!(by_g, Verdict::Allow, "grant");
                    prop_assert_ne!(by_b, Verdict::Deny, "delegate");
                    prop_assert!(by_a == Verdict::RequireApproval || by_b == Verdict::RequireApproval);
                }
                Verdict::Deny => {}
            }
            // An approval never lifts a deny anywhere in the chain.
            let approved = engine_b.decide(&DecisionRequest { approved: true, ..delegated }).verdict;
            prop_assert_eq!(approved, if decision.verdict == Verdict::Deny { Verdict::Deny } else { Verdict::Allow });
        }
    }

    #[test]
    fn compile_is_deterministic(
        p in policy("p".into(), "agent"),
        q in policy("q".into(), "agent"),
    ) {
        let forward = ObjectSet { identities: vec![identity("agent", false)], policies: vec![p.clone(), q.clone()], grants: vec![] };
        let backward = ObjectSet { identities: vec![identity("agent", false)], policies: vec![q, p], grants: vec![] };
        let options = CompileOptions { version: 9, now: NOW };
        let one = compile_all(&forward.inventory(), &options);
        let two = compile_all(&forward.inventory(), &options);
        let three = compile_all(&backward.inventory(), &options);
        prop_assert_eq!(one.snapshots[0].to_bytes(), two.snapshots[0].to_bytes());
        prop_assert_eq!(one.snapshots[0].to_bytes(), three.snapshots[0].to_bytes());
        prop_assert!(one.snapshots[0].hash_is_valid());
    }
}

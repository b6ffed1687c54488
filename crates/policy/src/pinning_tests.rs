use super::*;

const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[test]
fn off_checks_nothing() {
    for pin in [ToolPin::Unpinned, ToolPin::Pinned(A)] {
        for current in [None, Some(A), Some(B)] {
            assert_eq!(
                pin_verdict(ToolPinning::Off, pin, current),
                PinVerdict::Unchecked
            );
        }
    }
    assert!(PinVerdict::Unchecked.passes());
    assert_eq!(PinVerdict::Unchecked.as_str(), "Off");
}

#[test]
fn a_pinned_definition_matches_only_itself() {
    for mode in [ToolPinning::Observe, ToolPinning::Enforce] {
        assert_eq!(
            pin_verdict(mode, ToolPin::Pinned(A), Some(A)),
            PinVerdict::Matches
        );
        let differs = pin_verdict(mode, ToolPin::Pinned(A), Some(B));
        assert_eq!(
            differs,
            PinVerdict::Differs {
                pinned: A.into(),
                current: B.into()
            }
        );
        assert!(!differs.passes());
        assert_eq!(
            differs.to_string(),
            format!("tool definition changed: pinned {A}, now {B}")
        );
        assert_eq!((differs.pinned(), differs.current()), (Some(A), Some(B)));
    }
}

#[test]
fn an_unpinned_tool_reports_its_current_definition() {
    let verdict = pin_verdict(ToolPinning::Enforce, ToolPin::Unpinned, Some(B));
    assert_eq!(verdict, PinVerdict::Unpinned { current: B.into() });
    assert_eq!(
        verdict.to_string(),
        format!("tool definition is not pinned (now {B})")
    );
    assert!(!verdict.passes());
}

#[test]
fn an_unseen_definition_is_unknown() {
    for pin in [ToolPin::Unpinned, ToolPin::Pinned(A)] {
        let verdict = pin_verdict(ToolPinning::Enforce, pin, None);
        assert_eq!(verdict, PinVerdict::Unknown);
        assert_eq!(
            verdict.to_string(),
            "tool definition not yet seen: list the tools first"
        );
        assert!(!verdict.passes());
    }
}

#[test]
fn conflicting_pins_match_no_definition() {
    let pins = [A.to_owned(), B.to_owned()];
    let pin = ToolPin::of(&pins);
    assert_eq!(pin, ToolPin::Conflicting(&pins));
    for current in [Some(A), Some(B)] {
        let verdict = pin_verdict(ToolPinning::Enforce, pin, current);
        assert_eq!(
            verdict,
            PinVerdict::Conflicting {
                current: current.map(str::to_owned)
            }
        );
        assert_eq!(verdict.to_string(), "conflicting pins");
    }
    assert_eq!(
        pin_verdict(ToolPinning::Observe, pin, None),
        PinVerdict::Conflicting { current: None }
    );
}

#[test]
fn pins_of_one_and_none() {
    assert_eq!(ToolPin::of(&[]), ToolPin::Unpinned);
    assert_eq!(ToolPin::of(&[A.to_owned()]), ToolPin::Pinned(A));
}

#[test]
fn definition_hashes_are_sha256_and_lowercase_hex() {
    assert!(is_definition_hash(A));
    assert!(!is_definition_hash(&A.to_uppercase()));
    assert!(!is_definition_hash("sha256:abc"));
    assert!(!is_definition_hash(&A.replace("sha256:", "sha512:")));
}

//! `chaperonectl completion SHELL`: a completion script for each shell that
//! knows every command, and a refusal naming the shells for any other.

use std::process::{Command, Output};

fn chaperonectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chaperonectl"))
        .args(args)
        .output()
        .expect("running chaperonectl")
}

#[test]
fn each_shells_script_completes_every_command() {
    for (shell, marker) in [
        ("bash", "complete -F _chaperonectl"),
        ("zsh", "#compdef chaperonectl"),
        ("fish", "complete -c chaperonectl"),
    ] {
        let out = chaperonectl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        for command in ["approval", "check", "policy", "status", "tools", "version"] {
            assert!(script.contains(command), "{shell} script lacks {command}");
        }
        assert!(
            script.contains("from-cluster"),
            "{shell} script lacks policy's --from-cluster"
        );
    }
}

#[test]
fn an_unknown_shell_is_refused_naming_the_known_ones() {
    let out = chaperonectl(&["completion", "tcsh"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'tcsh'")
            && stderr.contains("bash")
            && stderr.contains("fish"),
        "{stderr}"
    );
}

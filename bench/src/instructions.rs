//! Instructions per call, counted by `valgrind --tool=callgrind`: a measure of
//! a proxy's own work that does not move with how busy the machine is (a
//! shared VM's latency and CPU-time figures do), so a change's effect on it
//! can be read from one run.
//!
//! A proxy runs under callgrind with instrumentation off
//! ([`callgrind_wrapper`]); the harness warms it up, turns instrumentation
//! on ([`Callgrind::start`]), makes its calls, then dumps the counts
//! ([`Callgrind::finish`]), which [`dump_totals`] reads. Only user-space
//! instructions are counted (the kernel's share, syscalls and wake-ups, is
//! not), and every thread of the process is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Errors of driving callgrind or reading its output.
#[derive(Debug, thiserror::Error)]
pub enum InstructionsError {
    /// `callgrind_control` could not run or failed.
    #[error("callgrind_control {args}: {why}")]
    Control {
        /// Its arguments.
        args: String,
        /// What went wrong.
        why: String,
    },
    /// No dump appeared where callgrind was told to write it.
    #[error("no callgrind dump {} appeared", .0.display())]
    NoDump(PathBuf),
    /// A dump without a `totals:` (or `summary:`) line of instructions.
    #[error("callgrind dump {} has no instruction totals", .0.display())]
    NoTotals(PathBuf),
}

/// The command (program and arguments) a proxy runs under so that its
/// instructions can be counted later: callgrind, instrumentation off until
/// [`Callgrind::start`], its dumps written to `out` (`out.1`, `out.2`, …).
pub fn callgrind_wrapper(out: &Path) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        "--instr-atstart=no".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ]
}

/// A process running under [`callgrind_wrapper`].
#[derive(Debug)]
pub struct Callgrind {
    pid: u32,
    out: PathBuf,
    /// Dumps written so far (callgrind numbers them from 1).
    dumps: u32,
}

impl Callgrind {
    /// The process `pid`, started under [`callgrind_wrapper`]`(out)`.
    pub fn new(pid: u32, out: &Path) -> Self {
        Self {
            pid,
            out: out.to_owned(),
            dumps: 0,
        }
    }

    /// Zeroes the counts and turns instrumentation on.
    pub fn start(&self) -> Result<(), InstructionsError> {
        self.control(&["--instr=on"])?;
        self.control(&["--zero"])
    }

    /// Dumps the counts since [`Self::start`] and returns the instructions
    /// executed, all threads together.
    pub fn finish(&mut self) -> Result<u64, InstructionsError> {
        self.control(&["--dump"])?;
        self.dumps += 1;
        let dump = self.last_dump();
        // The dump is written by the process itself, shortly after the
        // command is taken.
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&dump)
                && let Some(total) = dump_totals(&text)
            {
                let _ = self.control(&["--instr=off"]);
                return Ok(total);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if dump.exists() {
            Err(InstructionsError::NoTotals(dump))
        } else {
            Err(InstructionsError::NoDump(dump))
        }
    }

    /// The file of the last dump.
    pub fn last_dump(&self) -> PathBuf {
        PathBuf::from(format!("{}.{}", self.out.display(), self.dumps))
    }

    fn control(&self, args: &[&str]) -> Result<(), InstructionsError> {
        let mut command = Command::new("callgrind_control");
        command.args(args).arg(self.pid.to_string());
        let failed = |why: String| InstructionsError::Control {
            args: args.join(" "),
            why,
        };
        let output = command.output().map_err(|e| failed(e.to_string()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(failed(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }
}

/// The instruction total of a callgrind dump: its `totals:` line (or, in
/// older formats, `summary:`), whose first number is `Ir` when only
/// instructions are collected (callgrind's default).
pub fn dump_totals(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_totals_line() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) main\n3 10\n\ntotals: 123456\n";
        assert_eq!(dump_totals(dump), Some(123_456));
        assert_eq!(dump_totals("events: Ir\nsummary: 42\n"), Some(42));
        assert_eq!(dump_totals("events: Ir\nfn=(1) main\n3 10\n"), None);
    }
}

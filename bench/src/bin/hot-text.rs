//! `hot-text`: writes the sidecar's code-layout linker script
//! (`crates/sidecar/hot-text.ld`) from a link map and the profiles of a run
//! (`chaperone_bench::hot_text`). `make hot-text` (bench/hot-text.sh) makes
//! the inputs and calls it.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use chaperone_bench::hot_text::{LinkMap, callgrind_functions, layout, perf_functions, render};
use clap::Parser;

/// Flags of `hot-text`.
#[derive(Debug, Parser)]
#[command(
    name = "hot-text",
    about = "Writes chaperone-sidecar's code-layout linker script from a link map and profiles"
)]
struct Args {
    /// lld's link map of the sidecar build the profiles ran (`--no-demangle`).
    #[arg(long)]
    map: PathBuf,
    /// callgrind dumps of the sidecar.
    #[arg(long, num_args = 1..)]
    callgrind: Vec<PathBuf>,
    /// `perf script -F ip,sym --no-demangle` output of native runs.
    #[arg(long, num_args = 1..)]
    perf: Vec<PathBuf>,
    /// Lines for the script's header: the commit and the runs profiled.
    #[arg(long, default_value = "")]
    provenance: String,
    /// Where to write the script.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let map = LinkMap::parse(&read(&args.map)?)
        .with_context(|| format!("reading the link map {}", args.map.display()))?;
    let mut functions = BTreeSet::new();
    for dump in &args.callgrind {
        functions.extend(callgrind_functions(&read(dump)?));
    }
    let from_callgrind = functions.len();
    for script in &args.perf {
        functions.extend(perf_functions(&read(script)?));
    }
    anyhow::ensure!(!functions.is_empty(), "no profile named a function");
    let layout = layout(&map, functions.iter().map(String::as_str));
    anyhow::ensure!(
        layout.found > 0,
        "none of the {} profiled functions is in the link map: the map is of another build",
        functions.len()
    );
    std::fs::write(&args.out, render(&layout, &args.provenance))
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "hot-text: {} functions ran ({from_callgrind} seen by callgrind, {} more only by perf); \
         {} in the binary, {} elsewhere (libc, vDSO); {} section patterns, {} whole objects → {}",
        functions.len(),
        functions.len() - from_callgrind,
        layout.found,
        layout.not_in_binary,
        layout.sections.len(),
        layout.objects.len(),
        args.out.display()
    );
    Ok(())
}

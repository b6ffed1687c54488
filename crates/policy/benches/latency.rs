//! Decision latency percentiles (criterion reports means and medians): times
//! individual decisions and prints p50/p99/p99.9 per configuration.
//! `cargo bench -p chaperone-policy --bench latency`.
//!
//! Arguments `TOOLSxRULES` (CEL: `TOOLSxRULEScel`, e.g. `10000x10`) run only
//! those configurations and skip the compile and `tools/list` timings. `HOT=n`
//! spreads the calls over the first `n` tools only (same engine): the working
//! set shrinks while the index and the rules stay as large, which tells cache
//! misses from work.

mod fixture;

use std::hint::black_box;
use std::time::{Duration, Instant};

use chaperone_policy::{CompileOptions, DecisionRequest, Engine, SessionHistory, compile};
use fixture::{Spread, arguments, engine, objects, server_of, tool_name};

const SAMPLES: usize = 200_000;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_nanos() as f64 / 1000.0
}

fn measure(engine: &Engine, tools: usize) -> Vec<Duration> {
    let args = arguments();
    let session = SessionHistory::new();
    let mut spread = Spread::new();
    // `HOT=n`: only the first n tools are called (see the top of the file).
    let hot: usize = std::env::var("HOT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tools);
    let calls: Vec<(&str, String)> = (0..4096)
        .map(|_| {
            let i = spread.next(hot.min(tools));
            (server_of(i), tool_name(i))
        })
        .collect();
    let mut samples = Vec::with_capacity(SAMPLES);
    // Warm up caches and branch predictors.
    for n in 0..SAMPLES / 10 {
        let (server, tool) = &calls[n % calls.len()];
        let request = DecisionRequest {
            server,
            tool,
            arguments: &args,
            session: &session,
            delegation: None,
            initiator: None,
            now: 0,
            approved: false,
            definition: Default::default(),
        };
        black_box(engine.decide(&request));
    }
    for n in 0..SAMPLES {
        let (server, tool) = &calls[n % calls.len()];
        let request = DecisionRequest {
            server,
            tool,
            arguments: &args,
            session: &session,
            delegation: None,
            initiator: None,
            now: 0,
            approved: false,
            definition: Default::default(),
        };
        let start = Instant::now();
        let decision = engine.decide(black_box(&request));
        samples.push(start.elapsed());
        assert!(decision.forwards(), "bench call must be allowed");
    }
    samples.sort_unstable();
    samples
}

fn main() {
    // Cost of the clock itself, included in every sample below.
    let mut clock = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let start = Instant::now();
        clock.push(start.elapsed());
    }
    clock.sort_unstable();
    println!(
        "clock overhead: p50 {:.3} µs, p99 {:.3} µs",
        percentile(&clock, 0.5),
        percentile(&clock, 0.99)
    );
    println!("| tools | rules/tool | CEL | p50 µs | p99 µs | p99.9 µs |");
    println!("|---:|---:|:---:|---:|---:|---:|");
    let configs = [
        (10, 1, false),
        (10, 10, false),
        (10, 50, false),
        (1_000, 1, false),
        (1_000, 10, false),
        (1_000, 50, false),
        (10_000, 1, false),
        (10_000, 10, false),
        (10_000, 50, false),
        (10, 1, true),
        (10, 10, true),
        (1_000, 1, true),
        (1_000, 10, true),
        (10_000, 1, true),
        (10_000, 10, true),
    ];
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (tools, rules, cel) in configs {
        if !only.is_empty()
            && !only.contains(&format!("{tools}x{rules}{}", if cel { "cel" } else { "" }))
        {
            continue;
        }
        let engine = engine(tools, rules, cel);
        let samples = measure(&engine, tools);
        println!(
            "| {tools} | {rules} | {} | {:.3} | {:.3} | {:.3} |",
            if cel { "yes" } else { "no" },
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            percentile(&samples, 0.999),
        );
    }
    if !only.is_empty() {
        return;
    }
    // Compile time of 10,000 policies, and building the engine from it.
    let set = objects(10_000, 1, false);
    let options = CompileOptions { version: 1, now: 0 };
    let mut compile_ms = Vec::new();
    let mut engine_ms = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let compiled = compile(&set.identities[0], &set.inventory(), &options);
        compile_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        black_box(Engine::new(&compiled.snapshot).map(|_| ()).ok());
        engine_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    compile_ms.sort_by(f64::total_cmp);
    engine_ms.sort_by(f64::total_cmp);
    println!(
        "compile 10,000 policies: median {:.1} ms (min {:.1}); Engine::new: median {:.1} ms (min {:.1})",
        compile_ms[2], compile_ms[0], engine_ms[2], engine_ms[0]
    );
    // tools/list filtering of 1,000 tools.
    let engine = engine(1_000, 10, false);
    let tools: Vec<(&str, String)> = (0..1_000).map(|i| (server_of(i), tool_name(i))).collect();
    let mut list_us = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let shown = tools.iter().filter(|(s, t)| engine.visible(s, t)).count();
        list_us.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(shown, 1_000);
    }
    list_us.sort_by(f64::total_cmp);
    println!(
        "tools/list filter of 1,000 tools: p50 {:.1} µs, p99 {:.1} µs",
        list_us[100], list_us[198]
    );
}

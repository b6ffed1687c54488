//! Criterion benches of the policy engine: decision latency by number of tools
//! and rules per tool (with and without CEL), tools/list filtering of 1,000
//! tools, and compiling 10,000 policies. `cargo bench -p chaperone-policy --bench decide`.

mod fixture;

use std::hint::black_box;
use std::time::Duration;

use chaperone_policy::{CompileOptions, DecisionRequest, Engine, SessionHistory, compile};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fixture::{Spread, arguments, engine, objects, server_of, tool_name};

fn calls(tools: usize) -> Vec<(&'static str, String)> {
    let mut spread = Spread::new();
    (0..1024)
        .map(|_| {
            let i = spread.next(tools);
            (server_of(i), tool_name(i))
        })
        .collect()
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let args = arguments();
    let session = SessionHistory::new();
    for (tools, rules, cel) in [
        (10, 1, false),
        (10, 50, false),
        (1_000, 1, false),
        (1_000, 50, false),
        (10_000, 1, false),
        (10_000, 50, false),
        (10, 1, true),
        (1_000, 1, true),
        (10_000, 1, true),
    ] {
        let engine: Engine = engine(tools, rules, cel);
        let calls = calls(tools);
        let label = format!(
            "{tools}tools/{rules}rules/{}",
            if cel { "cel" } else { "plain" }
        );
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            let mut n = 0usize;
            b.iter(|| {
                let (server, tool) = &calls[n % calls.len()];
                n += 1;
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
                black_box(engine.decide(black_box(&request)))
            });
        });
    }
    group.finish();
}

fn bench_visible(c: &mut Criterion) {
    let engine = engine(1_000, 10, false);
    let tools: Vec<(&str, String)> = (0..1_000).map(|i| (server_of(i), tool_name(i))).collect();
    c.bench_function("tools_list_filter/1000tools", |b| {
        b.iter(|| {
            tools
                .iter()
                .filter(|(server, tool)| engine.visible(server, tool))
                .count()
        });
    });
}

fn bench_compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let set = objects(10_000, 1, false);
    let options = CompileOptions { version: 1, now: 0 };
    group.bench_function("10000policies/snapshot", |b| {
        b.iter(|| compile(&set.identities[0], &set.inventory(), &options));
    });
    let snapshot = compile(&set.identities[0], &set.inventory(), &options).snapshot;
    group.bench_function("10000policies/engine", |b| {
        b.iter(|| Engine::new(&snapshot).map(|_| ()));
    });
    group.finish();
}

criterion_group!(benches, bench_decide, bench_visible, bench_compile);
criterion_main!(benches);

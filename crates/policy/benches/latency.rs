//! Decision latency percentiles (written below).

fn main() {}

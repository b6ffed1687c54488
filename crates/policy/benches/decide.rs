//! Criterion benches of the policy engine (written below).

fn main() {}

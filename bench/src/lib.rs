//! Shared pieces of Chaperone's benchmarks.
#![forbid(unsafe_code)]

//! Criterion benchmarks live in `benches/benches/`; run them with
//! `cargo bench -p ployz-benches`. Results worth keeping go to BENCHMARKS.md.

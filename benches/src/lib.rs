//! Criterion benchmarks live in `benches/benches/`, one file per subject.

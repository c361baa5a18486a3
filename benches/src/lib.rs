//! Criterion micro-benchmarks of Kerwen's hot paths live in `benches/benches/`; this
//! library is empty. The benchmarks arrive with the performance engineering issue.

//! kerwen-loadtest: Kerwen's load generator (arrives with the performance issue).

fn main() {
    eprintln!("kerwen-loadtest is not implemented yet (see the performance engineering issue).");
    std::process::exit(2)
}

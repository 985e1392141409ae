//! The perf suite runner.

fn main() {
    eprintln!("perf: not built yet");
}

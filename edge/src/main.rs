//! `tabbify-node`: the public edge.

fn main() {
    eprintln!("tabbify-node: not built yet");
    std::process::exit(2);
}

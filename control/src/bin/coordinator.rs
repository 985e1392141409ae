//! `tabbify-mesh-coordinator`: the control plane service.

fn main() {
    eprintln!("tabbify-mesh-coordinator: not built yet");
    std::process::exit(2);
}

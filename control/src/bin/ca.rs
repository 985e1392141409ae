//! `tabbify-mesh-ca`: mints the mesh CA and its certificates.

fn main() {
    eprintln!("tabbify-mesh-ca: not built yet");
    std::process::exit(2);
}

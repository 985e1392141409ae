//! `tabbify-mesh`: the joiner.

fn main() {
    println!("tabbify-mesh");
}

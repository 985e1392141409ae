//! Scale benchmark (placeholder until the coordinator exists).

fn main() {}

//! The Tabbify mesh control plane: the coordinator, the CA helper, and what the joiner
//! and the edge share with them (API types, address derivation).
#![forbid(unsafe_code)]

pub mod ca;
pub mod ula;

//! Sans-IO core: plain functions and state machines over caller-owned byte slices.
#![forbid(unsafe_code)]

//! `tabbify-node`: the public edge into app ULAs.
#![forbid(unsafe_code)]

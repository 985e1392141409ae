//! Checked views over packet bytes (being written).

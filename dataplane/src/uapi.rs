//! WireGuard cross-platform UAPI (being written).

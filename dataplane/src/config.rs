//! wg-quick configuration files (being written).

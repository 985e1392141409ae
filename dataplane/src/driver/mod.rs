//! Drivers: the loops that move packet batches between the kernel (`sys`) and the `core`.

//! The kernel surface: TUN, UDP sockets, offloads, addresses and routes.

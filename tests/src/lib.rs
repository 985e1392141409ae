//! Test harness for end-to-end tests: network namespaces, veth links and stock peers,
//! all created by the test and removed when it ends, even when it fails.

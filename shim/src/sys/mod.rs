//! Raw syscalls and unsafe code, kept small and explained.

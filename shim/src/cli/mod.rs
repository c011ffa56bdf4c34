//! The `spry` command line.

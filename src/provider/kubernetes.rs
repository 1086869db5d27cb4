//! The built-in `kubernetes` provider (being written).

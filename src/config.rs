//! The TOML experiment schema.

//! Picks and builds the provider for a connection (being written).

/// A connection resolved for one account.
pub struct ResolvedConnection;

/// Builds providers.
pub struct ProviderRegistry;

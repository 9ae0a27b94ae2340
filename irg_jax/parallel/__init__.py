"""Device mesh, logical sharding rules and multi-host start-up."""

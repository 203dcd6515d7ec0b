"""kdgate service."""

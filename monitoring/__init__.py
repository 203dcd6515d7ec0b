"""kdgate monitoring."""

"""kdgate distill."""

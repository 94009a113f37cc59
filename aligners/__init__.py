"""aligners."""

"""The web dashboard over a study storage (read-only)."""

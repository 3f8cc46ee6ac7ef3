"""firetitan."""

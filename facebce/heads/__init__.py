"""facebce.heads."""

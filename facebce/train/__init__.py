"""facebce.train."""

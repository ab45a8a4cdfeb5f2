"""facebce.deploy."""

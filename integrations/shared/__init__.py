"""What more than one integration (and the bench) reads the same way: version-compatibility
helpers, no framework glue of its own. Integrations import from here, never from each other."""

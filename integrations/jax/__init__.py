"""JAX integration: tileflow primitives and the jaxpr rewrite."""

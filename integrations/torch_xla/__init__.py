"""torch-xla integration: the tileflow backend on XLA devices."""

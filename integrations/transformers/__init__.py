"""transformers integration: ``tileflow.patch(model)`` and the AttentionInterface entry."""

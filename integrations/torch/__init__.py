"""torch integration: the ``tileflow`` dynamo backend (``torch.compile(backend="tileflow")``)."""

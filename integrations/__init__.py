"""Framework glue (``tileflow.integrations``): one package per framework. A framework
never imports another framework's integration."""

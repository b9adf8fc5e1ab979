"""The torch-xla tests run in their own virtual environment (torch 2.9.0 + torch_xla
2.9.0, built by ``.ci/xla-venv``): ``tests/integrations/test_torch_xla.py`` runs them
there with ``TILEFLOW_XLA_SUBPROCESS=1`` and ``PJRT_DEVICE=CPU``. The main suite's
interpreter (another torch) must not collect them."""

import os

if os.environ.get("TILEFLOW_XLA_SUBPROCESS") != "1":
    collect_ignore_glob = ["test_*.py"]

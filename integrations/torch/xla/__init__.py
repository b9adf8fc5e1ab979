"""torch-xla integration: the tileflow backend on XLA devices.

``torch.compile(model.forward, backend="tileflow")`` with the model on
``torch_xla.device()`` compiles through :func:`backend.xla_backend`: torch-xla's
``openxla`` backend plus tileflow's rewrite of the decode patterns, whose suite kernels
run as generated Pallas kernels on TPU (``make_kernel_from_pallas``) and as XLA ops of
their references on other XLA clients. ``tileflow.explain`` reports the path each match
took. Needs the ``tileflow[xla]`` extra (torch 2.9.0, torch_xla 2.9.0, jax 0.7.1).
"""

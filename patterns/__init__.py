"""The catalogue of decode patterns (``tileflow.patterns``).

One module per pattern: what it matches, the exactness conditions under which the
replacement computes the same function (shapes, dtypes, constants such as eps and
theta, layouts), and the suite kernel that replaces it. Each integration (torch
inductor, jaxpr, ONNX) turns these definitions into its own matcher; the names are
the ones every ``tileflow.explain`` report uses.
"""

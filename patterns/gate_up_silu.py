"""Pattern ``gate_up_silu``: ``silu(x @ Wg.T) * (x @ Wu.T)``, the gated MLP's first half.
Replaced by ``gate_up_silu`` when both products are ``matvec`` matches of the
same ``x`` without biases, of equal N, and SiLU's result is multiplied by the up
product (in either order) and used nowhere else."""

NAME = "gate_up_silu"
SUITE_KERNEL = "gate_up_silu"

"""The tile language: views, tiles and the few ops the decode suite needs."""

from tileflow.tile.builder import TileBuilder, TileDefinitionError  # noqa: F401
from tileflow.tile.ir import KernelIR, Range, RangeValue, View  # noqa: F401

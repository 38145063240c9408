"""Tile configurations and the limits of a launch grid.

A :class:`Config` is what autotuning chooses (codegen/autotune.py) and what the plan
(codegen/plan.py) is made for: the tile shape, warps and pipeline stages of every launch of a
call. :func:`launch_grid` is the skeleton's grid for a number of query tiles, programs per
tile and groups, checked against what CUDA launches.
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.errors import AttnCallError


@dataclass(frozen=True)
class Config:
    """A tile configuration: tile shape and the launch's warps and pipeline stages."""

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 1

    @property
    def block(self) -> tuple[int, int]:
        return (self.block_m, self.block_n)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}"


DEFAULT_CONFIG = Config()

MAX_GRID = (2 ** 31 - 1, 65535)         # CUDA's limits on grid axes 0 and 1


def launch_grid(n_query_tiles: int, batch_heads: int, n_groups: int) -> tuple[int, int, int]:
    """The skeleton's grid: (query tiles x batch x heads, groups, 1); an AttnCallError naming
    the arguments when a call needs more programs than CUDA launches on an axis."""
    grid = (n_query_tiles * batch_heads, n_groups, 1)
    if grid[0] > MAX_GRID[0] or grid[1] > MAX_GRID[1]:
        raise AttnCallError(f"arguments 'q' and 'k': this call needs {grid[0]} x {grid[1]} kernel "
                            f"programs (query tiles x batch x heads, residue groups), more than "
                            f"a GPU launches ({MAX_GRID[0]} x {MAX_GRID[1]}); split the batch or "
                            "use backend='torch'")
    return grid


def padded(d: int) -> int:
    """A head dimension padded to the power of two the skeleton's tiles use (at least 16)."""
    return max(16, 1 << max(0, (d - 1).bit_length()))

"""The built-in attention implementations, one line each; the default order is theirs.

``implementation=None`` tries cuDNN, then blockwise: the first whose checks pass runs
(:mod:`thdkit.kernels.base`). Pallas and the dense reference run when asked for by name.
"""

from thdkit.kernels.base import register
from thdkit.kernels.blockwise import Blockwise
from thdkit.kernels.cudnn import Cudnn
from thdkit.kernels.dense import Dense
from thdkit.kernels.pallas import Pallas

__all__: list[str] = []

register(Cudnn(), default=True)
register(Blockwise(), default=True)
register(Pallas())
register(Dense())

"""The built-in attention implementations, one line each; the default order is theirs.

``implementation=None`` tries cuDNN, then blockwise: the first whose checks pass runs
(:mod:`thdkit._src.kernels.base`). Pallas and the dense reference run when asked for by name.
"""

from thdkit._src.kernels.base import register
from thdkit._src.kernels.blockwise import Blockwise
from thdkit._src.kernels.cudnn import Cudnn
from thdkit._src.kernels.dense import Dense
from thdkit._src.kernels.pallas import Pallas

__all__: list[str] = []

register(Cudnn(), default=True)
register(Blockwise(), default=True)
register(Pallas())
register(Dense())

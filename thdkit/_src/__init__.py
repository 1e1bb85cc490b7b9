"""thdkit's private core: nothing here is API (the public names are re-exported by ``thdkit``,
``thdkit.kernels``, ``thdkit.context_parallel``, ``thdkit.reorder``, ``thdkit.flax`` and
``thdkit.data``); modules move and change without notice."""

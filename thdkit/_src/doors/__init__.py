"""The doors: one module per calling convention, each turning its vocabulary into
:class:`thdkit.Segments` and options and calling the core: thdkit's keywords (``keywords``),
``jax.nn.dot_product_attention``'s (``jax_nn`` with its layout, checks and dense path) and
FlashAttention's varlen form (``flash_attn``)."""

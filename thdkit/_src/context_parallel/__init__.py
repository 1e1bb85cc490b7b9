"""Context parallelism, bottom up: ``base`` (the strategy protocol, its configuration and the
registry), ``shards`` (what strategies share), ``schedule`` (which ring steps run), one module per
strategy (``ring``, ``all_gather``, ``all_to_all``), ``builtins`` (the built-ins, one line each),
``program`` (a strategy under ``shard_map``), ``api`` (the entry points) and ``traffic`` (the
bytes each strategy moves)."""

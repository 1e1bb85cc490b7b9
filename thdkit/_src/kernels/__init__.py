"""The attention implementations, their protocol (``base``), the registry's built-ins
(``builtins``), the plan, the configuration, partial attention and the shared flash VJP."""

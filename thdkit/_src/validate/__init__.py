"""Validation, in one room: user arrays into int32 layouts (``inputs``), the layout rules
(``rules``) and a :class:`Segments` checked as a whole (``segments``)."""

"""Display drivers: they own I/O and time.  ``terminal`` runs the Rich Live loop; ``web`` serves
the Dash app (the only place dash is imported on the traceml side).  Both draw with the pure
renderers over a ``Callable[[], StoreView]``, live or replayed alike."""

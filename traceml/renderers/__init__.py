"""Renderers: pure functions from view models to Rich renderables (``terminal``) or Plotly
figures (``figures``).  No clock, no I/O: the drivers decide when and where to draw."""

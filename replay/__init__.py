"""replay: read traceml recordings back (engine, dashboard, reports)."""

"""Query layer: search, duplicates, and the `dinoseek` command line."""

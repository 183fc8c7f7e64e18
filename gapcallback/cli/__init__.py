"""The `gapcallback` command line."""

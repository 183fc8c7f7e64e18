"""``python -m gapcallback``: the command line (:mod:`gapcallback.cli.main`)."""

from gapcallback.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Pure parsers for the raw formats datasets ship in; no I/O beyond reading a file."""

"""The file formats: pure parsers for those datasets ship in (no I/O beyond reading a
file), and the JPEG shards datapipe writes for large image datasets."""

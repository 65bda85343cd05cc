"""The ``legolm`` command line."""

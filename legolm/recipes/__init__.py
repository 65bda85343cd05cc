"""Recipes: whole jobs assembled from the library (the CLI commands are thin front doors to them)."""

"""Fuzz targets for firmgate's hostile-input parsers (see fuzz/README.md)."""

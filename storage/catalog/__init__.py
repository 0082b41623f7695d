"""The DuckDB lineage and metrics catalog; see docs/catalog.md."""

from storage.catalog.catalog import (
    KINDS,
    SPLITS,
    STATUSES,
    TRIGGERS,
    Catalog,
    CatalogError,
    default_catalog_path,
)
from storage.catalog.db import CatalogBusy
from storage.catalog.schema import LATEST as SCHEMA_VERSION

__all__ = [
    "KINDS", "SPLITS", "STATUSES", "TRIGGERS", "SCHEMA_VERSION",
    "Catalog", "CatalogBusy", "CatalogError", "default_catalog_path",
]

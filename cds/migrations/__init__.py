"""Schema migrations of the store (Alembic). :func:`cds.migrate.upgrade` applies them; each file in ``versions/``
is one step, written out in operations (never generated at run time), so a database made by any earlier release
is brought to the current schema with its data."""

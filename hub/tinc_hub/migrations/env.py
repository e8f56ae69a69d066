"""Alembic's environment: runs on the connection upgrade_to_head() hands over, inside the
transaction it began (so Alembic begins and commits nothing itself)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, transactional_ddl=True,
                  transaction_per_migration=False)
context.run_migrations()

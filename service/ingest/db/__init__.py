"""The database side: the store and its pool, the tables and their migrations, receipts and dead letters."""

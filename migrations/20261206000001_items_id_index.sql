-- no-transaction
-- `item_reference` inputs name an item by id alone, in any of the caller's
-- conversations (a client replaying its history by reference). Not unique:
-- a forked conversation holds copies of its source's items, ids included.
-- Built concurrently: the items table is live. sqlx runs this file outside
-- a transaction (the first line says so), and it must hold this one
-- statement only.
-- squawk-ignore ban-concurrent-index-creation-in-transaction, require-timeout-settings
CREATE INDEX CONCURRENTLY IF NOT EXISTS items_id_idx ON items (id);

-- no-transaction
-- Idempotency records expire after api.idempotency_retention_ms; the api
-- processes delete expired ones in small batches, oldest first, which this
-- index serves. Built concurrently: the table is live. sqlx runs this file
-- outside a transaction (the first line says so), and it must hold this
-- one statement only.
-- squawk-ignore ban-concurrent-index-creation-in-transaction, require-timeout-settings
CREATE INDEX CONCURRENTLY IF NOT EXISTS idempotency_keys_created_at_idx
ON idempotency_keys (created_at);

-- no-transaction
-- The reconciler's scan for turns whose enqueue was lost, and the worker's
-- look-up of a conversation's next queued turn. Built concurrently: the
-- responses table is live. sqlx runs this file outside a transaction (the
-- first line says so), and it must hold this one statement only: several
-- statements in one query string form an implicit transaction. lock_timeout
-- comes from `turnpike migrate`'s connection.
-- squawk-ignore ban-concurrent-index-creation-in-transaction, require-timeout-settings
CREATE INDEX CONCURRENTLY IF NOT EXISTS responses_queued_idx
ON responses (conversation_id, id)
WHERE status = 'queued';

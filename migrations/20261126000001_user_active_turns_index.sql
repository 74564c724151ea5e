-- no-transaction
-- The per-user cap on active turns: `POST /v1/responses` counts the
-- caller's queued and running turns in its transaction on the primary.
-- Partial, so it holds only the few active turns of each user and finished
-- turns leave it. Built concurrently: the responses table is live. sqlx runs
-- this file outside a transaction (the first line says so), and it must hold
-- this one statement only. lock_timeout comes from `turnpike migrate`'s
-- connection.
-- squawk-ignore ban-concurrent-index-creation-in-transaction, require-timeout-settings
CREATE INDEX CONCURRENTLY IF NOT EXISTS responses_user_active_idx
ON responses (user_id)
WHERE status IN ('queued', 'in_progress');

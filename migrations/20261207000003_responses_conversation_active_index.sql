-- no-transaction
-- Whether a conversation has a queued or running turn, and which of its
-- turns runs next, are asked on every create, start and finish. They were
-- answered by whichever partial index the planner liked: one over the
-- user's active turns (`responses_user_active_idx`) served them by reading
-- every active turn of the user, and the dead entries of the turns before
-- them, for one conversation's. A partial index holds only the rows in
-- its states as of the last vacuum, usually none, so its statistics say
-- it is empty, and a plan that reads all of it looks free. This one is
-- keyed on the conversation: whichever plan uses it reads that
-- conversation's entries only. Built concurrently: the responses table is
-- live. sqlx runs this file outside a transaction (the first line says
-- so), and it must hold this one statement only.
-- squawk-ignore ban-concurrent-index-creation-in-transaction, require-timeout-settings
CREATE INDEX CONCURRENTLY IF NOT EXISTS responses_conversation_active_idx
ON responses (conversation_id)
WHERE status IN ('queued', 'in_progress');

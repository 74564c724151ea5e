-- A turn that starts a conversation, created in one call: the api's create
-- was five statements in a transaction (the conversation, the user's limits,
-- the input items, the response, then the commit), each a round trip to the
-- primary and, through PgBouncer in transaction mode, parsed and planned
-- again. The call rides in one message with the commit (the api sends
-- `BEGIN` first, on its own, so that the wait for a server stays inside its
-- acquire timeout), and PostgreSQL keeps the plans of the statements inside
-- for the life of the server connection.
--
-- Nobody else can see the conversation before the commit, so there is no
-- active turn to look for and no sequence number to reserve: the input
-- holds 1..n and the response runs at once.
--
-- The limits are checked the cheap way only: while the user is comfortably
-- clear of both, the turn is created; otherwise nothing is written and the
-- answer is empty, and the api checks each limit in full (locking what it
-- must) in a transaction of its own.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION turnpike_create_first_turn(
    p_user uuid,
    p_conversation uuid,
    p_metadata jsonb,
    -- Created only while the user has fewer queued or running turns than
    -- this (NULL: not counted) ...
    p_active_below bigint,
    -- ... and its items with the user's stored ones come to at most this
    -- many bytes (NULL: not counted).
    p_storage_cap bigint,
    p_incoming bigint,
    p_response uuid,
    p_model text,
    p_background boolean,
    p_request jsonb,
    -- The input items, in order.
    p_item_ids uuid [],
    p_item_kinds text [],
    p_item_bodies jsonb []
) RETURNS SETOF responses
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := coalesce(array_length(p_item_ids, 1), 0);
    created responses;
BEGIN
    IF p_active_below IS NOT NULL AND (
        SELECT count(*) FROM (
            SELECT 1 FROM responses
             WHERE user_id = p_user AND status IN ('queued', 'in_progress')
             LIMIT p_active_below) AS active
    ) >= p_active_below THEN
        RETURN;
    END IF;
    IF p_storage_cap IS NOT NULL AND (
        SELECT coalesce(sum(bytes), 0) FROM user_stored_bytes WHERE user_id = p_user
    ) + p_incoming > p_storage_cap THEN
        RETURN;
    END IF;
    INSERT INTO conversations (id, user_id, metadata, last_seq)
    VALUES (p_conversation, p_user, p_metadata, n);
    INSERT INTO items (conversation_id, seq, id, kind, body, response_id)
    SELECT p_conversation, t.ord, t.id, t.kind, t.body, p_response
      FROM unnest(p_item_ids, p_item_kinds, p_item_bodies) WITH ORDINALITY AS t (id, kind, body, ord);
    INSERT INTO responses (id, conversation_id, user_id, status, model, background, request,
                           input_first_seq, input_last_seq)
    VALUES (p_response, p_conversation, p_user, 'queued', p_model, p_background, p_request, 1, n)
    RETURNING * INTO created;
    RETURN NEXT created;
END
$$;

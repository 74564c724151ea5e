-- A new turn created in one call. The api's create was up to ten
-- statements in a transaction (find the response it continues, lock the
-- conversation, look for a later turn and an active one, the user's limits,
-- reserve sequence numbers, the input items, the response, the commit),
-- each a round trip to the primary and, through PgBouncer in transaction
-- mode, parsed and planned again. The call rides in one message with the
-- commit (the api sends `BEGIN` first, on its own, so that the wait for a
-- server stays inside its acquire timeout), and PostgreSQL keeps the plans
-- of the statements inside for the life of the server connection.
--
-- Only the common path is taken here: a turn in a new conversation, or
-- added to the user's conversation (directly or after its latest response),
-- running at once or waiting behind the active turn, its user comfortably
-- clear of the limits. Anything else — a conversation or response not
-- found, a busy conversation whose request rejects waiting, a response
-- with a later turn (the api forks the conversation), a user near a limit
-- — writes nothing and answers no row: the api then creates the turn
-- statement by statement, as before, and answers exactly as before.
--
-- Locks are taken in the order every writer of a conversation's turns takes
-- them: the conversation first.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION turnpike_create_turn(
    p_user uuid,
    -- Where the turn goes: the conversation, or the one holding the
    -- response it continues, or (both NULL) a new conversation of this id.
    p_conversation uuid,
    p_previous uuid,
    p_new_conversation uuid,
    -- Whether a busy conversation refuses the turn (`multitask: reject`)
    -- rather than queueing it.
    p_reject_busy boolean,
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
    conversation uuid := p_conversation;
    fresh boolean := p_conversation IS NULL AND p_previous IS NULL;
    busy boolean := false;
    first_seq bigint := 1;
    created responses;
BEGIN
    IF p_previous IS NOT NULL THEN
        SELECT r.conversation_id INTO conversation
          FROM responses r WHERE r.id = p_previous AND r.user_id = p_user;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    IF NOT fresh THEN
        PERFORM 1 FROM conversations c
         WHERE c.id = conversation AND c.user_id = p_user AND c.deleted_at IS NULL
           FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF p_previous IS NOT NULL AND EXISTS (
            SELECT 1 FROM responses r WHERE r.conversation_id = conversation AND r.id > p_previous
        ) THEN
            RETURN;
        END IF;
        busy := EXISTS (
            SELECT 1 FROM responses r
             WHERE r.conversation_id = conversation AND r.status IN ('queued', 'in_progress'));
        IF busy AND p_reject_busy THEN
            RETURN;
        END IF;
    END IF;
    IF p_active_below IS NOT NULL AND (
        SELECT coalesce(sum(turns), 0) FROM user_active_turns WHERE user_id = p_user
    ) >= p_active_below THEN
        RETURN;
    END IF;
    IF p_storage_cap IS NOT NULL AND (
        SELECT coalesce(sum(bytes), 0) FROM user_stored_bytes WHERE user_id = p_user
    ) + p_incoming > p_storage_cap THEN
        RETURN;
    END IF;
    IF fresh THEN
        conversation := p_new_conversation;
        INSERT INTO conversations (id, user_id, last_seq) VALUES (conversation, p_user, n);
    ELSE
        -- A turn behind an active one keeps its input pending: it joins
        -- the conversation after that turn's output, when it starts.
        UPDATE conversations
           SET last_seq = last_seq + CASE WHEN busy THEN 0 ELSE n END,
               version = version + 1, updated_at = now()
         WHERE id = conversation
        RETURNING last_seq - n + 1 INTO first_seq;
    END IF;
    IF busy THEN
        INSERT INTO responses (id, conversation_id, user_id, status, model, background, request,
                               input_first_seq, input_last_seq, pending_input)
        VALUES (p_response, conversation, p_user, 'queued', p_model, p_background, p_request,
                0, -1, to_jsonb(p_item_bodies))
        RETURNING * INTO created;
    ELSE
        INSERT INTO items (conversation_id, seq, id, kind, body, response_id)
        SELECT conversation, first_seq + t.ord - 1, t.id, t.kind, t.body, p_response
          FROM unnest(p_item_ids, p_item_kinds, p_item_bodies)
               WITH ORDINALITY AS t (id, kind, body, ord);
        INSERT INTO responses (id, conversation_id, user_id, status, model, background, request,
                               input_first_seq, input_last_seq)
        VALUES (p_response, conversation, p_user, 'queued', p_model, p_background, p_request,
                first_seq, first_seq + n - 1)
        RETURNING * INTO created;
    END IF;
    RETURN NEXT created;
END
$$;

-- A turn's end in one call. The worker's finish was eight statements in a
-- transaction (lock the conversation, lock the response, store the last
-- step, reserve the output's sequence numbers, insert the items, update the
-- response, find the next queued turn), each one a round trip and, through
-- PgBouncer in transaction mode, each one parsed and planned again. As a
-- function it is one statement, and PostgreSQL keeps the plans of the
-- statements inside it for the life of the server connection, whichever
-- client's transaction runs on it.
--
-- Locks are taken in the order every writer of a conversation's turns takes
-- them: the conversation, then the response.
--
-- outcome: 'done' (recorded), 'ended' (the response had ended meanwhile,
-- cancelled while running: nothing recorded), 'superseded' (another worker
-- stored the last step first and runs the turn now: the caller rolls back).
-- next_queued: the conversation's oldest queued turn when none is in
-- progress (not looked for when superseded).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION turnpike_finish_turn(
    p_response uuid,
    p_conversation uuid,
    p_user uuid,
    p_status text,
    p_output jsonb,
    p_usage jsonb,
    p_error jsonb,
    p_incomplete jsonb,
    -- The loop's last step when it is stored with the outcome, else NULL.
    p_step bigint,
    p_step_kind text,
    p_step_items jsonb,
    p_step_usage jsonb,
    p_step_prompt jsonb,
    -- The output items to append to the conversation, in order.
    p_item_ids uuid [],
    p_item_kinds text [],
    p_item_bodies jsonb [],
    p_item_prompts jsonb [],
    -- Where the items go when the conversation cannot take them (deleted).
    p_fallback_seq bigint
) RETURNS TABLE (outcome text, next_queued uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    current_status text;
    n bigint := coalesce(array_length(p_item_ids, 1), 0);
    first_seq bigint;
BEGIN
    PERFORM 1 FROM conversations WHERE id = p_conversation FOR NO KEY UPDATE;
    SELECT status INTO current_status FROM responses WHERE id = p_response FOR UPDATE;
    IF current_status IS NULL OR current_status NOT IN ('queued', 'in_progress') THEN
        outcome := 'ended';
    ELSE
        IF p_step IS NOT NULL THEN
            INSERT INTO response_steps (response_id, step, kind, items, usage, prompt)
            VALUES (p_response, p_step, p_step_kind, p_step_items, p_step_usage, p_step_prompt)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'superseded'::text, NULL::uuid;
                RETURN;
            END IF;
        END IF;
        IF n > 0 THEN
            UPDATE conversations
               SET last_seq = last_seq + n, version = version + 1, updated_at = now()
             WHERE id = p_conversation AND user_id = p_user AND deleted_at IS NULL
            RETURNING last_seq - n + 1 INTO first_seq;
            INSERT INTO items (conversation_id, seq, id, kind, body, response_id, prompt)
            SELECT p_conversation, coalesce(first_seq, p_fallback_seq) + t.ord - 1,
                   t.id, t.kind, t.body, p_response, t.prompt
              FROM unnest(p_item_ids, p_item_kinds, p_item_bodies, p_item_prompts)
                   WITH ORDINALITY AS t (id, kind, body, prompt, ord);
        END IF;
        UPDATE responses
           SET status = p_status, output = p_output, usage = p_usage, error = p_error,
               incomplete_details = p_incomplete, updated_at = now()
         WHERE id = p_response;
        outcome := 'done';
    END IF;
    next_queued := (
        SELECT q.id FROM responses q
         WHERE q.conversation_id = p_conversation AND q.status = 'queued'
           AND NOT EXISTS (SELECT 1 FROM responses a
                            WHERE a.conversation_id = p_conversation AND a.status = 'in_progress')
         ORDER BY q.id LIMIT 1);
    RETURN NEXT;
END
$$;

-- A turn's start in one call, and its first freeze of the conversation's
-- prompt settings moved into its finish.
--
-- The start was a statement that locked the conversation and started the
-- response, the costliest of a turn's statements to plan, and, on a
-- conversation's first turn, an UPDATE freezing its prompt settings. As a
-- function the start's plans are kept by the server connection (through
-- PgBouncer too, see the migration before). The first freeze needs nothing
-- of the start: the turn computes it from its own request, and the turn
-- behind it in the conversation starts only after this one's finish, so
-- the finish stores it (only where nothing froze the settings meanwhile,
-- say a turn that interrupted this one). A worker lost before the finish
-- leaves them unfrozen; the redelivered turn computes the same settings
-- again. A later turn that changes the settings still freezes the change
-- in its start, with the developer message that announces it.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- The started response (NULL row when there is nothing to run: cancelled
-- before it started, finished already, or a first delivery of a running
-- turn), and the conversation's frozen prompt settings as of its lock.
CREATE OR REPLACE FUNCTION turnpike_start_turn(p_response uuid, p_redelivery boolean)
RETURNS TABLE (r responses, frozen jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    conversation uuid;
    frozen_before jsonb;
    started responses;
BEGIN
    -- The conversation first, as every writer of its turns locks it.
    SELECT c.id, c.frozen INTO conversation, frozen_before
      FROM conversations c
     WHERE c.id = (SELECT q.conversation_id FROM responses q WHERE q.id = p_response)
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE responses
       SET status = 'in_progress', updated_at = now()
     WHERE id = p_response AND conversation_id = conversation
       AND (status = 'queued' OR (status = 'in_progress' AND p_redelivery))
    RETURNING * INTO started;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    r := started;
    frozen := frozen_before;
    RETURN NEXT;
END
$$;

-- The finish of the migration before, taking the first freeze. The
-- overload without it stays for the workers of the release before, which
-- still call it while a rolling update replaces them.
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
    p_fallback_seq bigint,
    -- The conversation's prompt settings as its first turn froze them, when
    -- that turn is this one; kept only if nothing froze them meanwhile.
    p_frozen jsonb
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
               SET last_seq = last_seq + n, version = version + 1, updated_at = now(),
                   frozen = coalesce(frozen, p_frozen)
             WHERE id = p_conversation AND user_id = p_user AND deleted_at IS NULL
            RETURNING last_seq - n + 1 INTO first_seq;
            INSERT INTO items (conversation_id, seq, id, kind, body, response_id, prompt)
            SELECT p_conversation, coalesce(first_seq, p_fallback_seq) + t.ord - 1,
                   t.id, t.kind, t.body, p_response, t.prompt
              FROM unnest(p_item_ids, p_item_kinds, p_item_bodies, p_item_prompts)
                   WITH ORDINALITY AS t (id, kind, body, prompt, ord);
        ELSIF p_frozen IS NOT NULL THEN
            UPDATE conversations SET frozen = p_frozen WHERE id = p_conversation AND frozen IS NULL;
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

-- A worker's start and finish of a turn, one call each. The finish was
-- eight statements in a transaction (lock the conversation, lock the
-- response, store the last step, reserve the output's sequence numbers,
-- insert the items, update the response, find the next queued turn) and the
-- start a statement that was the costliest of a turn's to plan; each one a
-- round trip and, through PgBouncer in transaction mode, parsed and planned
-- again. PostgreSQL keeps the plans of the statements inside a PL/pgSQL
-- function for the life of the server connection, whichever client's
-- transaction runs on it.
--
-- Locks are taken in the order every writer of a conversation's turns takes
-- them: the conversation, then the response.
--
-- A conversation's first turn freezes its prompt settings in its finish, not
-- its start: the turn computes them from its own request, and the turn
-- behind it in the conversation starts only after this one's finish. Only
-- where nothing froze them meanwhile (a turn that interrupted this one). A
-- worker lost before the finish leaves them unfrozen; the redelivered turn
-- computes them again. A later turn that changes the settings freezes the
-- change in its start, with the developer message that announces it.
--
-- A function the workers call is never changed in place: a new signature is
-- a new overload, and the old one stays for the workers of the release
-- before during a rolling update.
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

-- outcome: 'done' (recorded), 'ended' (the response had ended meanwhile,
-- cancelled while running: nothing recorded), 'superseded' (another worker
-- stored the last step first and runs, or ran, the turn: the caller rolls
-- back and stops without a word). next_queued: the conversation's oldest
-- queued turn when none is in progress (not looked for when superseded).
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
        -- Ended by the worker that stored this step first: that one ran
        -- the turn, and this one stops without a word.
        IF p_step IS NOT NULL AND EXISTS (
            SELECT 1 FROM response_steps WHERE response_id = p_response AND step = p_step
        ) THEN
            RETURN QUERY SELECT 'superseded'::text, NULL::uuid;
            RETURN;
        END IF;
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

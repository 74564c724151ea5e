-- Queued and running turns per user, striped as the stored bytes are. A new
-- turn's limit check counted the user's active responses through the
-- partial index on them, which keeps an entry for every version a turn
-- passes through (queued, then in progress) until vacuum can remove it;
-- and nothing can while any snapshot (a replica's, through
-- hot_standby_feedback) might still see the version. Under a steady stream
-- of one user's turns every create walked thousands of such entries. The
-- count is now kept here, in the stripe of the turn's conversation, by
-- triggers on every change that starts or ends a turn's activity: a new
-- turn, a status change into or out of queued/in progress, a deleted
-- response. The triggers are deferred to the commit, so a transaction locks
-- its active-turn stripe after everything else it locks (the conversation,
-- the user's row near the cap, the stored bytes' stripe when it writes
-- items), whatever order its statements ran in: an interrupt cancels the
-- turns it replaces before it appends its input, a create appends its
-- input before it inserts its response, and neither can hold one stripe
-- while waiting for the other's.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- squawk-ignore require-timeout-settings
CREATE TABLE IF NOT EXISTS user_active_turns (
    user_id uuid NOT NULL REFERENCES users (id),
    stripe bigint NOT NULL,
    turns bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, stripe)
);

CREATE OR REPLACE FUNCTION turnpike_count_active_turns() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    turn responses;
    delta bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        turn := OLD;
        delta := -1;
    ELSIF TG_OP = 'INSERT' THEN
        turn := NEW;
        delta := 1;
    ELSE
        turn := NEW;
        delta := CASE WHEN NEW.status IN ('queued', 'in_progress') THEN 1 ELSE -1 END;
    END IF;
    INSERT INTO user_active_turns AS a (user_id, stripe, turns)
    VALUES (turn.user_id, turnpike_storage_stripe(turn.conversation_id), delta)
    ON CONFLICT (user_id, stripe) DO UPDATE SET turns = a.turns + excluded.turns;
    RETURN NULL;
END
$$;

-- No turn starts or ends between the count below and the triggers.
LOCK TABLE responses IN SHARE ROW EXCLUSIVE MODE;

DROP TRIGGER IF EXISTS responses_active_inserted ON responses;
CREATE CONSTRAINT TRIGGER responses_active_inserted AFTER INSERT ON responses
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.status IN ('queued', 'in_progress'))
EXECUTE FUNCTION turnpike_count_active_turns();

DROP TRIGGER IF EXISTS responses_active_changed ON responses;
CREATE CONSTRAINT TRIGGER responses_active_changed AFTER UPDATE OF status ON responses
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW
WHEN ((OLD.status IN ('queued', 'in_progress')) IS DISTINCT FROM (NEW.status IN ('queued', 'in_progress')))
EXECUTE FUNCTION turnpike_count_active_turns();

DROP TRIGGER IF EXISTS responses_active_deleted ON responses;
CREATE CONSTRAINT TRIGGER responses_active_deleted AFTER DELETE ON responses
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (OLD.status IN ('queued', 'in_progress'))
EXECUTE FUNCTION turnpike_count_active_turns();

DELETE FROM user_active_turns;
INSERT INTO user_active_turns (user_id, stripe, turns)
SELECT user_id, turnpike_storage_stripe(conversation_id), count(*)
  FROM responses
 WHERE status IN ('queued', 'in_progress')
 GROUP BY 1, 2;

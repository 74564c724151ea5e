-- Storage per user, for limits.storage_bytes_per_user: the bytes of the
-- items (body and prompt, as JSON text) in the user's live conversations,
-- kept by statement-level triggers on items so that every writer (api,
-- workers, forks, purges) is counted without knowing of it. Deleting a
-- conversation subtracts its items (the api does, in the delete's
-- transaction); items of deleted conversations count no more. Counted from
-- this migration on. Adding a column with a constant default rewrites
-- nothing (lock_timeout comes from `turnpike migrate`'s connection).
-- squawk-ignore require-timeout-settings
ALTER TABLE users ADD COLUMN IF NOT EXISTS stored_bytes bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION turnpike_count_stored_bytes() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sign bigint := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
BEGIN
    UPDATE users u
       SET stored_bytes = greatest(u.stored_bytes + sign * d.bytes, 0)
      FROM (SELECT c.user_id,
                   sum(octet_length(changed.body::text)
                       + coalesce(octet_length(changed.prompt::text), 0)) AS bytes
              FROM changed JOIN conversations c ON c.id = changed.conversation_id
             WHERE c.deleted_at IS NULL
             GROUP BY c.user_id) d
     WHERE u.id = d.user_id;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS items_count_inserted_bytes ON items;
CREATE TRIGGER items_count_inserted_bytes AFTER INSERT ON items
REFERENCING NEW TABLE AS changed
FOR EACH STATEMENT EXECUTE FUNCTION turnpike_count_stored_bytes();

DROP TRIGGER IF EXISTS items_count_deleted_bytes ON items;
CREATE TRIGGER items_count_deleted_bytes AFTER DELETE ON items
REFERENCING OLD TABLE AS changed
FOR EACH STATEMENT EXECUTE FUNCTION turnpike_count_stored_bytes();

-- Storage per user, striped. Every write of a user's items used to add to
-- the one `users` row, so all of a user's concurrent writes queued on that
-- row's lock, held until each transaction committed: one API key creating
-- turns from 32 threads got about 100 a second. The count now lives in 16
-- stripes per user, a conversation's items always in the same stripe
-- (writers of one conversation already queue on its lock, so this adds no
-- wait); the quota check adds the user's stripes up. `users.stored_bytes`
-- is carried over into stripe 0 and no longer written.
-- squawk-ignore require-timeout-settings
CREATE TABLE IF NOT EXISTS user_stored_bytes (
    user_id uuid NOT NULL REFERENCES users (id),
    stripe bigint NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, stripe)
);

INSERT INTO user_stored_bytes (user_id, stripe, bytes)
SELECT id, 0, stored_bytes FROM users WHERE stored_bytes > 0
ON CONFLICT (user_id, stripe) DO NOTHING;

-- The stripe of a conversation: its id's last byte (random in a UUIDv7).
CREATE OR REPLACE FUNCTION turnpike_storage_stripe(conversation uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (get_byte(uuid_send(conversation), 15) % 16)::bigint
$$;

CREATE OR REPLACE FUNCTION turnpike_count_stored_bytes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Stripes in order, so two statements never lock them crosswise.
        INSERT INTO user_stored_bytes AS s (user_id, stripe, bytes)
        SELECT c.user_id, turnpike_storage_stripe(c.id),
               sum(octet_length(changed.body::text) + coalesce(octet_length(changed.prompt::text), 0))
          FROM changed JOIN conversations c ON c.id = changed.conversation_id
         WHERE c.deleted_at IS NULL
         GROUP BY 1, 2
         ORDER BY 1, 2
        ON CONFLICT (user_id, stripe) DO UPDATE SET bytes = s.bytes + excluded.bytes;
    ELSE
        UPDATE user_stored_bytes s
           SET bytes = greatest(s.bytes - d.bytes, 0)
          FROM (SELECT c.user_id, turnpike_storage_stripe(c.id) AS stripe,
                       sum(octet_length(changed.body::text)
                           + coalesce(octet_length(changed.prompt::text), 0)) AS bytes
                  FROM changed JOIN conversations c ON c.id = changed.conversation_id
                 WHERE c.deleted_at IS NULL
                 GROUP BY 1, 2) d
         WHERE s.user_id = d.user_id AND s.stripe = d.stripe;
    END IF;
    RETURN NULL;
END
$$;

-- The load profile's data set, written straight into the primary (replicas
-- follow by streaming replication): :users tenants named loadtest-NNNNNN,
-- each with one API key derived from its name, a long-tailed number of
-- conversations (1 + :convs_max * r^3, r uniform per tenant: most have a
-- few, some have many), each a long-tailed number of messages
-- (2 + :items_max * r^4), alternating user and assistant, whose text length
-- is long-tailed too (40 + :text_max * r^3 characters).
--
-- The key of tenant NAME is 'tp_' || hex(sha256('turnpike-loadtest:' || NAME));
-- the load generator derives it the same way and reads the conversation ids
-- back. Ids are derived from names, so seeding twice adds nothing.
--
-- psql -v users=1000 -v convs_max=24 -v items_max=160 -v text_max=1200 -f seed.sql
\set ON_ERROR_STOP on

BEGIN;

CREATE TEMP TABLE lt_users ON COMMIT DROP AS
SELECT
    format('loadtest-%s', lpad(n::text, 6, '0')) AS name,
    md5('turnpike-loadtest-user:' || n)::uuid AS id,
    (('x' || substr(md5('turnpike-loadtest-r:' || n), 1, 8))::bit(32)::bigint % 100000) / 100000.0 AS r
FROM generate_series(0, :users - 1) AS n;

INSERT INTO users (id, name)
SELECT id, name FROM lt_users
ON CONFLICT DO NOTHING;

INSERT INTO api_keys (id, user_id, key_hash)
SELECT
    md5('turnpike-loadtest-key:' || name)::uuid,
    id,
    sha256(convert_to('tp_' || encode(sha256(convert_to('turnpike-loadtest:' || name, 'UTF8')), 'hex'), 'UTF8'))
FROM lt_users
ON CONFLICT DO NOTHING;

CREATE TEMP TABLE lt_conversations ON COMMIT DROP AS
SELECT
    md5('turnpike-loadtest-conversation:' || u.name || ':' || c)::uuid AS id,
    u.id AS user_id,
    2 + floor(:items_max * power(random(), 4))::int AS items
FROM lt_users AS u,
    LATERAL generate_series(1, 1 + floor(:convs_max * power(u.r, 3))::int) AS c
WHERE NOT EXISTS (
    SELECT 1 FROM conversations AS existing
    WHERE existing.id = md5('turnpike-loadtest-conversation:' || u.name || ':' || c)::uuid
);

INSERT INTO conversations (id, user_id, last_seq, version)
SELECT id, user_id, items, items FROM lt_conversations;

INSERT INTO items (conversation_id, seq, id, kind, body)
SELECT
    c.id,
    s,
    m.id,
    'message',
    jsonb_build_object(
        'type', 'message',
        'id', 'msg_' || replace(m.id::text, '-', ''),
        'status', 'completed',
        'role', CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END,
        'content', jsonb_build_array(
            CASE WHEN s % 2 = 1
                THEN jsonb_build_object('type', 'input_text', 'text', t.text)
                ELSE jsonb_build_object('type', 'output_text', 'text', t.text, 'annotations', '[]'::jsonb)
            END
        )
    )
FROM lt_conversations AS c,
    LATERAL generate_series(1, c.items) AS s,
    LATERAL (SELECT md5(c.id::text || ':' || s)::uuid AS id) AS m,
    LATERAL (
        SELECT left(
            repeat('The quick brown fox jumps over the lazy dog; ', 1 + :text_max / 45),
            40 + floor(:text_max * power(random(), 3))::int
        ) AS text
        WHERE s > 0 -- correlated, so drawn again for every message
    ) AS t;

COMMIT;

ANALYZE users;
ANALYZE api_keys;
ANALYZE conversations;
ANALYZE items;

SELECT
    (SELECT count(*) FROM users WHERE name LIKE 'loadtest-%') AS tenants,
    (SELECT count(*) FROM conversations AS c JOIN users AS u ON u.id = c.user_id
     WHERE u.name LIKE 'loadtest-%') AS conversations,
    (SELECT sum(last_seq) FROM conversations AS c JOIN users AS u ON u.id = c.user_id
     WHERE u.name LIKE 'loadtest-%') AS items;

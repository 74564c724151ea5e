-- Users, API keys, conversations, items, responses (turns) and idempotency
-- records. Hot paths are primary-key lookups and keyset range scans:
--   items by (conversation_id, seq), conversations by (user_id, id).

SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS users (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a key is stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    key_hash bytea NOT NULL UNIQUE,
    admin boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX IF NOT EXISTS api_keys_user_id_idx ON api_keys (user_id);

-- last_seq is the highest item seq handed out; bumping it under the row lock
-- serializes appends to one conversation. version counts every change
-- (caches compare it). Deletion is soft.
CREATE TABLE IF NOT EXISTS conversations (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    metadata jsonb NOT NULL DEFAULT '{}',
    last_seq bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

CREATE INDEX IF NOT EXISTS conversations_user_id_id_idx ON conversations (user_id, id)
WHERE deleted_at IS NULL;

-- Append-only per conversation: (conversation_id, seq) orders a conversation.
-- body is the item exactly as the API returns it.
CREATE TABLE IF NOT EXISTS items (
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    seq bigint NOT NULL,
    id uuid NOT NULL,
    kind text NOT NULL,
    response_id uuid,
    body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq)
);

CREATE UNIQUE INDEX IF NOT EXISTS items_conversation_id_id_idx ON items (conversation_id, id);

-- One row per turn. The input items are the conversation's seqs
-- input_first_seq..=input_last_seq; request keeps the creation parameters.
CREATE TABLE IF NOT EXISTS responses (
    id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    user_id uuid NOT NULL REFERENCES users (id),
    status text NOT NULL,
    model text NOT NULL,
    background boolean NOT NULL DEFAULT false,
    request jsonb NOT NULL,
    input_first_seq bigint NOT NULL,
    input_last_seq bigint NOT NULL,
    output jsonb NOT NULL DEFAULT '[]',
    usage jsonb,
    error jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS responses_conversation_id_idx ON responses (conversation_id);

-- A POST retried with the same Idempotency-Key gets the first answer back.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id uuid NOT NULL REFERENCES users (id),
    key text NOT NULL,
    request_hash bytea NOT NULL,
    status_code bigint,
    response_headers jsonb,
    response_body bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

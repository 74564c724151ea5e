-- The agent loop's state: each completed step of a turn (a model call's
-- output, a batch of tool outputs, a compaction) is kept so that a
-- redelivered turn resumes after it instead of calling the model or the
-- tools again; a compaction item keeps the prompt window it stands for;
-- a conversation keeps the instructions and tools its prompts are frozen on.
-- New tables and nullable columns without defaults: catalog-only changes.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS response_steps (
    response_id uuid NOT NULL REFERENCES responses (id),
    step bigint NOT NULL,
    kind text NOT NULL,
    items jsonb NOT NULL,
    usage jsonb,
    prompt jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (response_id, step)
);

-- For a compaction item: the prompt input that replaces everything before
-- it (the provider's compacted window, or the summary and recent messages).
ALTER TABLE items ADD COLUMN IF NOT EXISTS prompt jsonb;

-- {instructions, tools}: what the conversation's first turn sent the model,
-- extended append-only when later turns add tools.
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS frozen jsonb;

-- A turn queued behind a conversation's active turn keeps its input here
-- until it starts, so that its input follows the active turn's output in
-- the conversation (and in the prompt). Adding a nullable column without a
-- default is a catalog-only change.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE responses ADD COLUMN IF NOT EXISTS pending_input jsonb;

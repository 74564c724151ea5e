-- Why a response ended `incomplete` (the provider's `incomplete_details`,
-- e.g. {"reason": "max_output_tokens"}). Nullable with no default: adding it
-- rewrites nothing and takes its lock only for a moment (lock_timeout comes
-- from `turnpike migrate`'s connection).
-- squawk-ignore require-timeout-settings
ALTER TABLE responses ADD COLUMN IF NOT EXISTS incomplete_details jsonb;

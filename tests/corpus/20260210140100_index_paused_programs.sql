-- Coaches see their paused programs first.
CREATE INDEX programs_paused_idx ON programs (coach_id, updated_at) WHERE status = 'paused';

DROP INDEX programs_paused_idx;

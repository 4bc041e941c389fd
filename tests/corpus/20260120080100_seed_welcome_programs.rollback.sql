DELETE FROM programs WHERE title IN ('Welcome to coaching', 'First-time managers');

-- Admins manage members and billing, but do not coach.
ALTER TYPE member_role ADD VALUE 'admin' BEFORE 'coach';

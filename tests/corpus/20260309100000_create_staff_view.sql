-- Who may see every program.
CREATE VIEW staff AS
SELECT id, email, display_name, role
FROM members
WHERE role IN ('owner', 'admin', 'coach');

DROP VIEW active_programs;
ALTER TABLE programs DROP COLUMN summary;

CREATE VIEW active_programs AS
SELECT p.id, p.title, p.starts_on, m.display_name AS coach
FROM programs p
LEFT JOIN members m ON m.id = p.coach_id
WHERE p.status = 'active';

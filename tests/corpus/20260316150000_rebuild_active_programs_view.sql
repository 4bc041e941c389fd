-- Programs get a summary; the dashboard shows it, lists paused programs too, and counts tags.
ALTER TABLE programs ADD COLUMN summary TEXT NOT NULL DEFAULT '';

DROP VIEW active_programs;
CREATE VIEW active_programs AS
SELECT p.id, p.title, p.summary, p.status, p.starts_on, m.display_name AS coach,
       (SELECT count(*) FROM program_tags t WHERE t.program_id = p.id) AS tag_count
FROM programs p
LEFT JOIN members m ON m.id = p.coach_id
WHERE p.status IN ('active', 'paused');

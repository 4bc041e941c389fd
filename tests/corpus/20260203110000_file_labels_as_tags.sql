-- Labels become tags: split once into a staging table, then filed into tags and program_tags.
CREATE TABLE program_tags (
    program_id BIGINT NOT NULL REFERENCES programs (id) ON DELETE CASCADE,
    tag TEXT NOT NULL REFERENCES tags (slug),
    PRIMARY KEY (program_id, tag)
);

CREATE TEMP TABLE label_stage AS
SELECT p.id AS program_id, lower(trim(label)) AS tag
FROM programs p, unnest(string_to_array(p.labels, ',')) AS label
WHERE trim(label) <> '';

INSERT INTO tags (slug, label)
SELECT DISTINCT tag, initcap(replace(tag, '-', ' ')) FROM label_stage ORDER BY tag
ON CONFLICT (slug) DO NOTHING;

INSERT INTO program_tags (program_id, tag)
SELECT DISTINCT program_id, tag FROM label_stage ORDER BY program_id, tag;

ALTER TABLE programs DROP COLUMN labels;

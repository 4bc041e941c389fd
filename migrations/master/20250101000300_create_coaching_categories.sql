-- Categories of coaching conversation, each optionally under a focus area.
CREATE TABLE public.coaching_categories (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    focus_area_id BIGINT REFERENCES public.focus_areas (id) ON DELETE SET NULL,
    slug TEXT NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9-]+$'),
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    sort_order INTEGER NOT NULL DEFAULT 0,
    is_active BOOLEAN NOT NULL DEFAULT true,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX coaching_categories_focus_area_id_idx ON public.coaching_categories (focus_area_id);

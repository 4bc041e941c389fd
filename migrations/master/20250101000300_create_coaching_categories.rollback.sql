DROP INDEX public.coaching_categories_focus_area_id_idx;
DROP TABLE public.coaching_categories;

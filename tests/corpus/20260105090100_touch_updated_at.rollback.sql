DROP TRIGGER members_touch ON members;
DROP FUNCTION touch_updated_at();

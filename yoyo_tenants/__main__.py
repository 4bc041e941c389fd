"""`python -m yoyo_tenants ...`: the `yoyo-tenants` command (see tasks.TenantsProgram)."""

from .tasks import main

if __name__ == "__main__":
    main()

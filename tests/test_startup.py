"""Start-up: a whole process imports what its command needs when it needs it (the "One hundred
thousand tenants" issue: `invoke` spent about 0.3 s importing before any work)."""

from __future__ import annotations

import subprocess
import sys

#: Imported only by the commands that draw or run them: progress bars (a terminal), tables
#: (status listing tenants), squawk's wrapper (lint, --lint), the installed version.
LATE = {"rich.progress", "rich.table", "yoyo_tenants.lint", "importlib.metadata"}


def loaded_by(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_api_imports_nothing_it_does_not_use():
    assert loaded_by("import yoyo_tenants") & LATE == set()


def test_the_tasks_import_nothing_it_does_not_use_beyond_invoke():
    # invoke itself reads importlib.metadata; nothing else of LATE comes with the tasks.
    assert loaded_by("import yoyo_tenants.tasks") & LATE == {"importlib.metadata"}


def test_the_version_is_still_there():
    assert loaded_by("import yoyo_tenants; assert yoyo_tenants.__version__") >= {
        "importlib.metadata"
    }

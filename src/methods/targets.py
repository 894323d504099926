"""Method `_target_` strings in one form: configs name every method class `src.methods.<Class>` (exported by
`src/methods/__init__.py`). Run dirs written before that change hold the long form `src.methods.<module>.<Class>`
(e.g. `src.methods.aft.AFT`) in `.hydra/config.yaml` and in summary.json's `method_config`; both forms import,
and code that compares targets compares them through `canonical_target`."""
from __future__ import annotations

import re
from typing import Optional

PREFIX = "src.methods."
_LONG = re.compile(r"^src\.methods\.(?:[a-z_][a-z0-9_]*\.)+([A-Z][A-Za-z0-9_]*)$")


def canonical_target(target: Optional[str]) -> Optional[str]:
    """`src.methods.<module>.<Class>` -> `src.methods.<Class>`; any other string (the short form, a non-method
    target) and None come back unchanged."""
    if target is None:
        return None
    target = str(target)
    m = _LONG.match(target)
    return PREFIX + m.group(1) if m else target


def same_target(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two `_target_` strings name the same method class, whichever form each is written in."""
    return canonical_target(a) == canonical_target(b)

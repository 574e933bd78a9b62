"""AFA stage II under its config-grammar name: ``--config=...:MODEL,afa_stage2``.

Everything lives in :mod:`agad.defenses.afa` (see its docstring); this module only gives
stage II a name the registry finds (``agad.defenses.<name>``).
"""

from agad.defenses.afa import STAGE2_DEFAULTS as DEFAULTS
from agad.defenses.afa import afa_stage2 as objective
from agad.defenses.afa import stage2_norm as norm

__all__ = ["DEFAULTS", "objective", "norm"]

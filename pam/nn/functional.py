"""``pam.nn.functional``: the PAM counterparts of ``torch.nn.functional`` (see
:mod:`pam.functional`, where they are defined)."""
from ..functional import *  # noqa: F401,F403
from ..functional import __all__, __doc__ as _doc  # noqa: F401

__doc__ = (__doc__ or "") + "\n\n" + (_doc or "")

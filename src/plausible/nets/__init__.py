r"""Neural backbones for diffusion denoisers.

Every backbone is called as ``net(x, t, context=None)`` where ``t`` is the (scalar or
per-sample) noise-level input, e.g. EDM's ``c_noise = log(sigma) / 4``, and exposes

* ``net.shape``: the event shape it acts on (``None`` when unknown at construction);
* ``net.config``: a JSON-serialisable dict such that ``type(net)(**net.config)`` rebuilds it.
"""

from .embedding import TimeEmbedding
from .mlp import ResMLP
from .unet import UNet

__all__ = ["ResMLP", "TimeEmbedding", "UNet"]

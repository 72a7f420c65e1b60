"""The passes, imported in the order they run (the registry keeps this order).

Weight normalization is folded first: the constant weight it leaves is what fold-batchnorm
folds into.

Group and instance normalization run before layer normalization: their decomposed forms
contain a layer-norm-shaped core that the layer-norm pass would otherwise take first.
"""
from normopt.passes import fold_weightnorm  # noqa: F401
from normopt.passes import fold_batchnorm  # noqa: F401
from normopt.passes import fuse_groupnorm  # noqa: F401
from normopt.passes import fuse_instancenorm  # noqa: F401
from normopt.passes import fuse_layernorm  # noqa: F401
from normopt.passes import fuse_rmsnorm  # noqa: F401

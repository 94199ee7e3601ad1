"""The recipes (registered in :mod:`jaxaigc.run`): one module per recipe, each with
``get_config(*, quick=False) -> ml_collections.ConfigDict`` (``quick``: every stage at a few
steps and tiny sizes, for the quick demo and the tests).

Sections: ``model`` (the network's fields, see :mod:`jaxaigc.configs.fields`), ``data``,
``optim``, ``mesh``, ``train`` and ``eval``; a recipe of several stages has a section per
stage and ``stages``: the stages in order, each with the run directory it is trained in or read
from, relative to the recipe's workdir (``"../clip"``: another recipe's run beside this one).
"""

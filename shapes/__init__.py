"""The shapes world: prompts over shapes, colours, counts and positions (:mod:`shapes.world`), an
exact evaluator (:mod:`shapes.evaluator`), a learned understanding module behind the judge and
proposer interfaces (:mod:`shapes.judge`, over the CNN perception of :mod:`shapes.perception`) and a
small generator (:mod:`shapes.policy`, pretrained by :mod:`shapes.pretrain`).

Submodules are imported explicitly (``from shapes.world import ...``); this package imports nothing
so that the light modules stay light.
"""

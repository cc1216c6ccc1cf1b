"""The shapes world: prompts over shapes, colours, counts and positions (:mod:`shapes.world`), an
exact evaluator (:mod:`shapes.evaluator`), a learned understanding module behind the judge and
proposer interfaces (:mod:`shapes.judge`) and a small generator (:mod:`shapes.policy`).

Submodules are imported explicitly (``from shapes.world import ...``); this package imports nothing
so that the light modules stay light.
"""

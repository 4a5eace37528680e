"""Captions: the pretraining text of a scene, naming every object and how they lie.

Relations use the position questions' "clearly apart" rule (``scenes.separated``), so captions and
questions never disagree about where an object is.
"""

from __future__ import annotations

from .scenes import Scene, separated
from .vocabulary import COUNT_WORDS, article

def caption(scene: Scene) -> str:
    """Pretraining caption naming every object, e.g. ``"a red circle left of a blue square"``.

    Two objects are related by the axis along which they are clearly apart; three or more are
    listed from left to right (by centre) after their count.
    """
    objs = sorted(scene.objects, key=lambda o: o.x)
    if len(objs) == 1:
        return f"{article(objs[0].color)} {objs[0].name}"
    if len(objs) == 2:
        a, b = objs
        if separated(a, b, "x"):
            return f"{article(a.color)} {a.name} left of {article(b.color)} {b.name}"
        top, bottom = sorted(objs, key=lambda o: o.y)
        return f"{article(top.color)} {top.name} above {article(bottom.color)} {bottom.name}"
    names = [f"{article(o.color)} {o.name}" for o in objs]
    return f"{COUNT_WORDS[len(objs)]} objects: {', '.join(names[:-1])} and {names[-1]}"

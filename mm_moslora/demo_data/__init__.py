"""Procedural visual-QA data: simple shape scenes, LLaVA training files and small benchmark look-alikes.

Everything the demo pipeline needs is generated here, deterministically from one seed:

```
sample_scene(rng) ──► Scene (1-4 non-overlapping coloured shapes, normalised coordinates)
        │                     │
        │ render_scene         └─► question generators (ask_*) ──► QA (question, answer, type, ...)
        ▼                                                   │
 images/train/*.png, images/eval/**.png            pretrain.json, finetune.json (LLaVA format)
                                                   eval/<bench>/ (LLaVA question files + official GT)
```

One module per concern; each imports only the ones listed above it:

```
vocabulary.py      colours, shapes, backgrounds, count words, colour mixing, held-out pairs
randomness.py      one seeded numpy stream per purpose; pick / sample
scenes.py          Scene, SceneObject, sample_scene (layout rules)
render.py          render_scene; draw_all (PNG files, worker processes)
captions.py        caption(scene): the pretraining text
questions.py       QA and the ask_* generators (visual and text-only), TRAIN_QUESTION_MIX
prompts.py         prompt_text (LLaVA answer-format suffixes, options), question_type_of
jsonfiles.py       atomic JSON / JSONL writes
run.py             GenerationRun: a run's streams, held-out rule, train/eval scene separation, images
training_files.py  pretrain.json / finetune.json records
benchmarks.py      eval/<bench>/ writers: VQAv2, POPE, ScienceQA, MME, GQA (official ground-truth formats)
write.py           generate (the entry point), read_manifest, re-run rules
baseline.py        majority_baseline, normalize_answer
```

Held-out (colour, shape) combinations never appear in a training/pretraining image nor in any training
text; evaluation scenes include them and every evaluation record says so in ``metadata["held_out"]``,
which measures compositional generalisation. The same arguments always give byte-identical files
(``workers`` changes speed, not output).

The names below are the package's interface for its callers (the pipeline, scripts, the tiny-backbone
pretraining and the tests); everything else is reached through its module.
"""

from .baseline import majority_baseline, normalize_answer
from .benchmarks import MME_SUBTASKS, POPE_SPLITS
from .captions import caption
from .prompts import SHORT_ANSWER_SUFFIX, prompt_text, question_type_of
from .questions import (TRAIN_QUESTION_MIX, ask, ask_alphabetical, ask_arithmetic, ask_color_mixing,
                        ask_mixed, ask_text_multiple_choice, ask_word_category)
from .render import render_scene
from .scenes import MAX_OBJECTS, MAX_SIZE, MIN_SIZE, Scene, SceneObject, sample_scene
from .vocabulary import BACKGROUNDS, COLORS, COUNT_WORDS, HELD_OUT_COMBINATIONS, SHAPES, all_combinations
from .write import DemoDataExistsError, generate, read_manifest

__all__ = [
    "BACKGROUNDS", "COLORS", "COUNT_WORDS", "HELD_OUT_COMBINATIONS", "MAX_OBJECTS", "MAX_SIZE", "MIN_SIZE",
    "MME_SUBTASKS", "POPE_SPLITS", "SHAPES", "SHORT_ANSWER_SUFFIX", "TRAIN_QUESTION_MIX", "DemoDataExistsError",
    "Scene", "SceneObject", "all_combinations", "ask", "ask_alphabetical", "ask_arithmetic", "ask_color_mixing",
    "ask_mixed", "ask_text_multiple_choice", "ask_word_category", "caption", "generate", "majority_baseline",
    "normalize_answer", "prompt_text", "question_type_of", "read_manifest", "render_scene", "sample_scene"]

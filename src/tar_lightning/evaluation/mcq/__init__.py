"""Multiple-choice evaluation (WMDP, MMLU and any question/choices/answer set), scored like lm-evaluation-harness.

The default setting reproduces lm-evaluation-harness 0.4 zero-shot ``multiple_choice`` scoring of the ``wmdp_*``
and ``mmlu_*`` tasks (``HFLM``, ``batch_size`` any, no chat template), so accuracies agree question by question
when the same questions are used:

- context: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` +
  ``"{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"`` (see :func:`format_context`);
- continuations ``" A"``, ``" B"``, ... ; the score of a choice is the summed log-probability of its continuation
  tokens given the context, the prediction the first index of the maximum score; no length normalisation;
- tokenisation as lm-eval's ``HFLM._encode_pair``: trailing whitespace of the context moves into the
  continuation, the context and the context+continuation strings are encoded separately, the continuation tokens
  are the whole encoding minus the first ``len(context tokens)``; encoded with ``add_special_tokens=False``
  (``HFLM``'s default for causal models, ``add_bos_token=False``); inputs longer than the model's maximum length
  are truncated on the left like lm-eval.

Speed: when every continuation of a question has the same number of tokens and they differ only in the last one
(the letter variant with any common tokenizer: ``" A"`` is one token), a question needs ONE forward pass: the log-
probabilities of all choices are read from the same next-token distribution. Otherwise each (question, choice) is
its own sequence. Sequences are sorted by length, padded on the right and run ``batch_size`` at a time; the results
are put back into the original question order.

Variants (additional to the standard, as the red-team requires):

- ``variant="cloze"``: lm-eval's ``mmlu_continuation`` style: context ``"The following are questions (with
  answers) about {subject}.\\n\\nQuestion: {question.strip()}\\nAnswer:"``, continuations ``" {choice text}"``;
  ``acc`` (summed log-prob) and ``acc_norm`` (log-prob divided by the choice's length in characters) are reported.
- ``chat_template=True``: as lm-eval's ``--apply_chat_template``: the description (``"The following are ..."``,
  preceded by the system prompt and ``"\\n\\n"`` when one is given) becomes the system message, the question text
  the user message, the tokenizer's chat template is applied with ``add_generation_prompt=True``, and the
  continuations carry NO leading space (lm-eval sets the target delimiter to ``""`` under a chat template:
  ``"A"``, or the bare choice text). Because the generation prompt ends with a newline, that newline moves into
  the continuation (``"\\nA"``); it is shared by all choices, so one forward per question still suffices.
  A template that rejects a system role is retried without the system message (lm-eval does the same).
- ``system_prompt`` without a chat template: ``system_prompt + "\\n\\n"`` is prepended to the context (lm-eval's
  ``--system_instruction``).
- ``variant="raw"``: no lm-eval format at all, for small models trained only on plain sentences (the knowledge
  world's cloze stems, :mod:`tar_lightning.data.knowledge`): the context is the question text exactly as given
  (no description, no ``"Question:"``/``"Answer:"``, not stripped; trailing whitespace moves into the
  continuation as usual), the continuations are ``" {choice text}"``, and the score of a choice is the summed
  log-probability of its continuation tokens (no length normalisation; the prediction is the first maximum).
  With ``system_prompt`` the context is ``system_prompt + "\\n\\n" + question``; a chat template is not
  supported (ConfigError).

Submodules (each imports its siblings directly; this ``__init__`` only re-exports their public names):
``items`` (questions and file readers), ``tasks`` (named tasks and the data root), ``prompts`` (contexts and
continuations), ``scoring`` (:func:`score_mcq`, :func:`evaluate_mcq_task`).
"""

from tar_lightning.evaluation.mcq.items import LETTERS, MCQItem, load_mcq
from tar_lightning.evaluation.mcq.prompts import MCQ_VARIANTS, continuations, format_context, setting_label
from tar_lightning.evaluation.mcq.scoring import MCQResult, evaluate_mcq_task, score_mcq
from tar_lightning.evaluation.mcq.tasks import (
    DATA_ROOT_ENV,
    MCQ_TASKS,
    MMLU_SUBJECTS,
    MCQTask,
    get_task,
    load_task_items,
    resolve_task,
)

__all__ = [
    "DATA_ROOT_ENV",
    "LETTERS",
    "MCQ_TASKS",
    "MCQ_VARIANTS",
    "MMLU_SUBJECTS",
    "MCQItem",
    "MCQResult",
    "MCQTask",
    "continuations",
    "evaluate_mcq_task",
    "format_context",
    "get_task",
    "load_mcq",
    "load_task_items",
    "resolve_task",
    "score_mcq",
    "setting_label",
]

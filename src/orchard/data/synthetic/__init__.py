"""A small, seeded, bilingual (English and Chinese) synthetic world and documents about it.

This is the data orchard ships with: ``orchard quickstart`` pretrains on it and the tests use it,
so nothing has to be downloaded. It has two layers:

* :class:`World` (``world``) -- people, cities, foods, colours, animals and jobs (:class:`Entity`), and the
  checkable statements linking them (:class:`Fact`). A world is fully determined by its
  arguments, and every fact renders as a sentence, a question and an answer in both languages.
* Document generators (``documents``) -- small functions ``(world, rng, lang) -> text`` registered by name in
  :data:`DOCUMENT_KINDS`. :func:`generate_documents` draws a deterministic mix of them.

Later stages grow it without changing what is here: instruction data asks ``fact.question()``
and expects ``fact.answer()``; preference pairs take wrong answers from the other entities of the
same kind (``world.by_kind(...)``); verifiable prompts are the exact-match items; a new
kind of document is one more function decorated with :func:`document_kind`.

Modules: ``world``, ``documents`` (pretraining text), ``instructions`` (SFT conversations and
exact-match items), ``alignment`` (preference pairs and verifiable prompts), ``continual`` (the
continual-learning tasks). Everything a caller uses is importable from this package.
"""

from .alignment import preference_pairs, verifiable_prompts, write_preference_corpus
from .continual import CONTINUAL_TASKS, continual_task, continual_task_conversations
from .documents import (DOCUMENT_KINDS, DocumentGenerator, arithmetic, arithmetic_problem, document_kind,
                        facts_paragraph, generate_documents, story, town, write_corpus, write_jsonl)
from .instructions import (answer_matches, exact_match_items, instruction_conversations, prompt_text, rival_answers,
                           world_answer_matches, write_instruction_corpus)
from .world import LANGUAGES, RELATIONS, Entity, Fact, World

__all__ = ["CONTINUAL_TASKS", "DOCUMENT_KINDS", "LANGUAGES", "RELATIONS", "DocumentGenerator", "Entity", "Fact",
           "World", "answer_matches", "arithmetic", "arithmetic_problem", "continual_task",
           "continual_task_conversations", "document_kind", "exact_match_items", "facts_paragraph",
           "generate_documents", "instruction_conversations", "preference_pairs", "prompt_text", "rival_answers",
           "story", "town", "verifiable_prompts", "world_answer_matches", "write_corpus", "write_instruction_corpus",
           "write_jsonl", "write_preference_corpus"]
